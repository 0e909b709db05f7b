"""ordergate: a peak-load order ingestion gateway.

The order's path is the package tree: ``gateway`` -> ``buffer`` -> ``workers`` -> PostgreSQL, with
``sharding`` shared by both sides. This package holds what runs them: settings, the embedded
servers, the supervisor and the command line.
"""

__version__ = "0.1.0"
