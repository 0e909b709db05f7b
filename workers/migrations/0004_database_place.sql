-- The database's place in `database_url`'s list (issue 17: shards across Postgres servers):
-- database `database_index` of `databases` holds the partitions of shards k with
-- floor(k * databases / shards) = database_index. A row recorded before this migration is the
-- one database of a single-database deployment: index 0 of 1. Processes started with the
-- databases in another order, or with another count, refuse to start.
ALTER TABLE ordergate_deployment
    ADD COLUMN IF NOT EXISTS database_index integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS databases      integer NOT NULL DEFAULT 1;
ALTER TABLE ordergate_deployment DROP CONSTRAINT IF EXISTS ordergate_deployment_place;
ALTER TABLE ordergate_deployment ADD CONSTRAINT ordergate_deployment_place
    CHECK (databases >= 1 AND databases <= shards
           AND database_index >= 0 AND database_index < databases);
