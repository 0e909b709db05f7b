-- When the drain took the order from its lane: the "processing" mark of its timeline. Redis
-- keeps no status record for a committed order; its status and timeline come from this row.
-- Rows committed before this migration have none.
ALTER TABLE orders ADD COLUMN IF NOT EXISTS taken_at timestamptz;
