-- Orders, declaratively partitioned by shard (LIST). Partitions are created by
-- `ordergate migrate` for every configured shard (orders_p0 .. orders_pN-1).
-- The pair (storefront_id, storefront_order_id) always hashes to the same shard, so the unique
-- key below, which must include the partition column, is unique over the whole table.
CREATE TABLE IF NOT EXISTS orders (
    shard               smallint    NOT NULL,
    order_id            text        NOT NULL,
    storefront_id       text        NOT NULL,
    storefront_order_id text        NOT NULL,
    customer_id         text        NOT NULL,
    customer_email      text,
    currency            char(3)     NOT NULL,
    total_minor         bigint      NOT NULL CHECK (total_minor >= 0),
    item_count          integer     NOT NULL,
    seq                 bigint      NOT NULL,
    accepted_at         timestamptz NOT NULL,
    committed_at        timestamptz NOT NULL DEFAULT now(),
    body                jsonb       NOT NULL,
    PRIMARY KEY (shard, order_id),
    UNIQUE (shard, storefront_id, storefront_order_id)
) PARTITION BY LIST (shard);

CREATE INDEX IF NOT EXISTS orders_storefront_accepted
    ON orders (storefront_id, accepted_at);
