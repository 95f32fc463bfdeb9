-- The same application schema on every node (pgmesh does not copy schema
-- when joining yet).
CREATE TABLE accounts (
    id         int PRIMARY KEY,
    owner      text NOT NULL,
    balance    numeric(12,2) NOT NULL,
    updated_in text NOT NULL
);
