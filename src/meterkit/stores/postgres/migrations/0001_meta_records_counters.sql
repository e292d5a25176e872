-- meta, records, counters, holds and claims
CREATE TABLE mk_meta (key text COLLATE "C" PRIMARY KEY, value text NOT NULL);
CREATE TABLE mk_records (kind text COLLATE "C", key text COLLATE "C", data jsonb NOT NULL, PRIMARY KEY (kind, key));
CREATE TABLE mk_counters (key text COLLATE "C" PRIMARY KEY, value bigint NOT NULL, expires_at bigint);
CREATE INDEX mk_counters_expires ON mk_counters (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE mk_holds (id text COLLATE "C" PRIMARY KEY, organization_id text NOT NULL, amounts jsonb NOT NULL, expires_at bigint NOT NULL);
CREATE INDEX mk_holds_expires ON mk_holds (expires_at);
CREATE TABLE mk_claims (marker text COLLATE "C" PRIMARY KEY, expires_at bigint);
CREATE INDEX mk_claims_expires ON mk_claims (expires_at) WHERE expires_at IS NOT NULL
