-- What this database was set up for: the shard count (one partition per shard) and the Redis key
-- prefix of its buffer. `ordergate migrate` writes the one row; gateways and workers started with
-- other values refuse to start (a different shard count routes the same storefront order to
-- another shard, where its unique key cannot see its twin).
CREATE TABLE IF NOT EXISTS ordergate_deployment (
    id          boolean     PRIMARY KEY DEFAULT true CHECK (id),
    shards      integer     NOT NULL CHECK (shards > 0),
    key_prefix  text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
