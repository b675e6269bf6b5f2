-- outbox-relay: a least-privilege PostgreSQL role for `outbox-relay run`, and optionally
-- one for the operator commands (`status`, `parked list|replay|discard`).
--
-- Run it after `outbox-relay migrate`, connected to the outbox's database as a superuser,
-- or as the role that owns the database and the outbox tables (the one that runs
-- `outbox-relay migrate`) if it also has CREATEROLE:
--
--   psql "postgres://owner@db.internal:5432/app?sslmode=verify-full" -v ON_ERROR_STOP=1 \
--        -v relay_role=outbox_relay -v schema=public \
--        -f deploy/sql/least-privilege.sql
--
-- and for a relay configured with relay.mode = "delete", opt in to DELETE on outbox:
--
--   psql ... -v relay_role=outbox_relay -v delete_mode=1 -f deploy/sql/least-privilege.sql
--
-- Variables (all optional):
--   relay_role     the relay's LOGIN role                           default outbox_relay
--   schema         the schema holding outbox and its tables         default public
--   delete_mode    1|on|true|yes: relay.mode = "delete", grant       default 0 (mark mode)
--                  DELETE on outbox instead of UPDATE of the sent
--                  columns; 0|off|false|no or unset: relay.mode =
--                  "mark"
--   keep_sent      mark mode only. 1|on|true|yes: relay.retain_sent   default 0
--                  = "0s", sent rows are kept for ever and the relay
--                  role cannot delete rows; 0|off|false|no or unset:
--                  DELETE on outbox too, for the retention of sent
--                  rows (relay.retain_sent, 7 days by default)
--   operator_role  a NOLOGIN group role for status / parked ...      default: not created
--                  (give it to people: GRANT outbox_relay_operator TO alice)
-- (relay_mode, which granted DELETE by default, is gone: the script refuses it.)
--
-- Switching relay.mode: each run grants one mode's privilege and revokes the other's. To
-- switch without a gap, grant the new mode's privilege by hand first (GRANT DELETE ON
-- outbox TO outbox_relay, or GRANT UPDATE (sent_at, kafka_partition, kafka_offset) ON
-- outbox TO outbox_relay), roll the relay over, then re-run this script for the new mode.
--
-- Migrations: run `outbox-relay migrate` with the credentials of the role that owns the
-- outbox tables, never with the relay's role (nor by granting the relay role more):
-- migrate needs DDL and CREATE on the schema, which the relay role must not hold, and the
-- tables it created would be the relay's own, and an owner bypasses every grant here (the
-- script refuses a relay role that owns them). After this script the owner can create in
-- the schema only as the schema's owner or through an explicit GRANT CREATE ON SCHEMA (see
-- below); the script warns if it cannot.
--
-- Idempotent: re-running revokes what the roles hold on the outbox tables (and on
-- outbox_id_seq and _sqlx_migrations) and grants exactly the list below again; re-run it
-- after upgrading outbox-relay. Everything happens in one transaction, and it ends by
-- printing what the roles hold. It also sets the relay role's search_path in this
-- database to the schema (the relay names its tables unqualified).
--
-- The role is created without a password. Set one without putting it in a shell history
-- or the server log: `\password outbox_relay` in psql (it sends only the SCRAM hash), or
-- use certificate authentication. Behind PgBouncer in transaction mode the relay sends no
-- statement_timeout: ALTER ROLE outbox_relay SET statement_timeout = '30s'.
--
-- What the relay role does NOT get: INSERT on outbox (services insert), DELETE on outbox
-- in mark mode with keep_sent set, TRUNCATE, REFERENCES, TRIGGER, CREATE on the schema or any
-- other DDL (`outbox-relay migrate` runs as the owner), anything on
-- _sqlx_migrations (only `migrate` reads it; `run` and `check` verify the schema by
-- selecting the outbox columns, see verify_schema in src/store.rs), the outbox_id_seq
-- sequence (the identity is filled by services' inserts), INSERT or DELETE on
-- outbox_shard_lease (its 256 rows are created by the migration), nothing on functions
-- (it calls none; LISTEN needs no privilege). It keeps what PostgreSQL gives PUBLIC by
-- default on databases and functions (CONNECT and TEMPORARY, EXECUTE); revoking those is a
-- database-wide decision this script leaves to you. An existing role with SUPERUSER,
-- CREATEDB, CREATEROLE, REPLICATION or BYPASSRLS, or owning the tables, is refused;
-- memberships in other roles are reported.
--
-- CREATE on the schema: the script runs REVOKE CREATE ON SCHEMA <schema> FROM PUBLIC (and
-- from the relay and operator roles). A role that can create in the relay's schema can
-- plant a function or operator that the relay's unqualified SQL resolves to instead of
-- the built-in one, and have it run with the relay's privileges (a search-path hijack).
-- PostgreSQL 15 no longer grants PUBLIC CREATE on schema public in new databases, but
-- databases created before 15 (and upgraded or restored from them) keep it. Roles other
-- than the schema's owner that must create there (the migrating role if it does not own
-- the schema, other applications' owners) need an explicit GRANT CREATE ON SCHEMA
-- afterwards. The script fails if PUBLIC or the relay role can still create there.
--
-- Verified against PostgreSQL 15 with `outbox-relay run` in both modes, parked rows, the
-- LISTEN doorbell, and `status` / `parked` as the operator role.
-- Requires psql 10 or later (\if, :{?var}).

\set ON_ERROR_STOP on

\if :{?relay_role}
\else
\set relay_role outbox_relay
\endif
\if :{?schema}
\else
\set schema public
\endif
\if :{?relay_mode}
-- Replaced by delete_mode: refuse it rather than guess, so an old command line that asked
-- for DELETE does not silently lose it (or one that did not, silently keep it).
DO $$ BEGIN RAISE EXCEPTION 'relay_mode is no longer supported: use -v delete_mode=1 for relay.mode = "delete", nothing for "mark"'; END $$;
\endif
\if :{?delete_mode}
\else
\set delete_mode 0
\endif
\if :{?keep_sent}
\else
\set keep_sent 0
\endif
\if :{?operator_role}
\else
\set operator_role ''
\endif

BEGIN;

-- The DO blocks below cannot see psql variables; hand them over as transaction-local
-- settings.
SET LOCAL outbox_relay.relay_role = :'relay_role';
SET LOCAL outbox_relay.schema = :'schema';
SET LOCAL outbox_relay.delete_mode = :'delete_mode';
SET LOCAL outbox_relay.keep_sent = :'keep_sent';
SET LOCAL outbox_relay.operator_role = :'operator_role';

-- Checks, then the relay role: created when missing; an existing role is used only if it
-- has none of the attributes that would bypass these grants.
DO $$
DECLARE
    relay  text := current_setting('outbox_relay.relay_role');
    schema text := current_setting('outbox_relay.schema');
    mode   text := lower(current_setting('outbox_relay.delete_mode'));
    keep   text := lower(current_setting('outbox_relay.keep_sent'));
    r      pg_roles%ROWTYPE;
    t      text;
    member text;
BEGIN
    IF relay = '' THEN
        RAISE EXCEPTION 'relay_role must not be empty';
    END IF;
    IF mode NOT IN ('1', 'on', 'true', 'yes', '0', 'off', 'false', 'no') THEN
        RAISE EXCEPTION 'delete_mode must be 1, on, true, yes (relay.mode = "delete") or 0, off, false, no, not "%"',
                        current_setting('outbox_relay.delete_mode');
    END IF;
    IF keep NOT IN ('1', 'on', 'true', 'yes', '0', 'off', 'false', 'no') THEN
        RAISE EXCEPTION 'keep_sent must be 1, on, true, yes (relay.retain_sent = "0s") or 0, off, false, no, not "%"',
                        current_setting('outbox_relay.keep_sent');
    END IF;
    FOREACH t IN ARRAY ARRAY['outbox', 'outbox_shard_lease', 'outbox_replica'] LOOP
        IF to_regclass(format('%I.%I', schema, t)) IS NULL THEN
            RAISE EXCEPTION 'table %.% does not exist: run `outbox-relay migrate` first, or set -v schema=...', schema, t;
        END IF;
    END LOOP;

    SELECT * INTO r FROM pg_roles WHERE rolname = relay;
    IF NOT FOUND THEN
        EXECUTE format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT '
                       'NOREPLICATION NOBYPASSRLS', relay);
        RAISE NOTICE 'created role % (LOGIN, no password yet: \password %)', relay, relay;
    ELSE
        IF r.rolsuper OR r.rolcreatedb OR r.rolcreaterole OR r.rolreplication OR r.rolbypassrls THEN
            RAISE EXCEPTION 'role % exists with SUPERUSER, CREATEDB, CREATEROLE, REPLICATION or BYPASSRLS; '
                            'ALTER ROLE % NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS first', relay, relay;
        END IF;
        IF NOT r.rolcanlogin THEN
            EXECUTE format('ALTER ROLE %I LOGIN', relay);
        END IF;
        FOR member IN
            SELECT g.rolname FROM pg_auth_members m
            JOIN pg_roles g ON g.oid = m.roleid
            WHERE m.member = r.oid
        LOOP
            RAISE WARNING 'role % is a member of role %: it can use that role''s privileges too', relay, member;
        END LOOP;
    END IF;
    -- An owner bypasses grants: the relay must not own its tables.
    FOREACH t IN ARRAY ARRAY['outbox', 'outbox_shard_lease', 'outbox_replica'] LOOP
        IF pg_get_userbyid((SELECT relowner FROM pg_class
                            WHERE oid = to_regclass(format('%I.%I', schema, t)))) = relay THEN
            RAISE EXCEPTION 'role % owns %.%: run migrations as another role and ALTER TABLE ... OWNER TO it', relay, schema, t;
        END IF;
    END LOOP;
END
$$;

SELECT current_database() AS dbname,
       lower(:'delete_mode') NOT IN ('1', 'on', 'true', 'yes') AS grant_mark,
       (lower(:'delete_mode') IN ('1', 'on', 'true', 'yes')
        OR lower(:'keep_sent') NOT IN ('1', 'on', 'true', 'yes')) AS grant_delete,
       :'operator_role' <> '' AS want_operator
\gset

-- Start from nothing on the relay's objects, so a re-run leaves exactly what follows.
-- (REVOKE ALL on a table also drops column-level grants.)
REVOKE ALL ON TABLE :"schema".outbox, :"schema".outbox_shard_lease, :"schema".outbox_replica
    FROM :"relay_role";
SELECT format('REVOKE ALL ON %s FROM %I', c.oid::regclass, :'relay_role')
FROM pg_class c
WHERE c.oid IN (to_regclass(format('%I.outbox_id_seq', :'schema')),
                to_regclass('_sqlx_migrations'))
\gexec

-- No CREATE in the schema for anyone but its owner (and roles granted it explicitly):
-- the relay's statements name tables, functions (now, width_bucket, unnest, count, ...)
-- and operators unqualified, and a role that can create in the schema on the relay's
-- search_path can plant a function or operator that matches the relay's arguments more
-- closely than pg_catalog's (width_bucket(bigint, bigint[]) beats the polymorphic
-- built-in) and runs with the relay's privileges when the relay calls it: a search-path
-- hijack. PUBLIC covers every role, the relay's included.
REVOKE CREATE ON SCHEMA :"schema" FROM PUBLIC;
REVOKE CREATE ON SCHEMA :"schema" FROM :"relay_role";

DO $$
DECLARE
    relay  text := current_setting('outbox_relay.relay_role');
    schema text := current_setting('outbox_relay.schema');
    owner  text := pg_get_userbyid((SELECT relowner FROM pg_class
                                    WHERE oid = to_regclass(format('%I.outbox', schema))));
    creator text;
BEGIN
    -- A REVOKE by a role that does not own the schema only warns and leaves the grant.
    IF has_schema_privilege('public', schema, 'CREATE') THEN
        RAISE EXCEPTION 'PUBLIC can still create in schema % (owner %): run this script as a superuser or as the schema''s owner',
                        schema, pg_get_userbyid((SELECT nspowner FROM pg_namespace WHERE nspname = schema));
    END IF;
    -- A schema's owner may drop anything in it and grant itself CREATE again, whatever the
    -- ACL says (pg_database_owner owns schema public: the database's owner).
    IF pg_has_role(relay, (SELECT nspowner FROM pg_namespace WHERE nspname = schema), 'MEMBER') THEN
        RAISE EXCEPTION 'role % owns schema % or is a member of its owner % (pg_database_owner: the database''s owner): give the schema and the database another owner first',
                        relay, schema, pg_get_userbyid((SELECT nspowner FROM pg_namespace WHERE nspname = schema));
    END IF;
    -- The relay role is NOINHERIT, but it could SET ROLE to any role it is a member of.
    SELECT string_agg(g.rolname, ', ') INTO creator
    FROM pg_roles g
    WHERE pg_has_role(relay, g.oid, 'MEMBER') AND has_schema_privilege(g.oid, schema, 'CREATE');
    IF creator IS NOT NULL THEN
        RAISE EXCEPTION 'role % can still create in schema %, as %: it must not own the schema, hold CREATE on it or be a member of a role that does',
                        relay, schema, creator;
    END IF;
    IF NOT has_schema_privilege(owner, schema, 'CREATE') THEN
        RAISE WARNING 'role % (owner of %.outbox) can no longer create in schema %, so `outbox-relay migrate` will fail: GRANT CREATE ON SCHEMA % TO % (or make it the schema''s owner)',
                      owner, schema, schema, schema, owner;
    END IF;
END
$$;

----------------------------------------------------------------------------------------
-- The relay role: what `outbox-relay run` (and `check`) need, statement by statement
-- (function names are those of src/store.rs).
----------------------------------------------------------------------------------------

-- Every connection of the pool and the LISTEN connection (wake.rs; LISTEN itself needs
-- no privilege).
GRANT CONNECT ON DATABASE :"dbname" TO :"relay_role";
-- Every statement names the tables below, unqualified: look them up in the schema, and
-- only there, whatever the server's default search_path (a role setting also applies
-- behind PgBouncer, which logs in as the role).
GRANT USAGE ON SCHEMA :"schema" TO :"relay_role";
ALTER ROLE :"relay_role" IN DATABASE :"dbname" SET search_path = :"schema";

-- outbox, SELECT on the whole table:
--   verify_schema:  SELECT id, aggregate_type, ..., shard, discarded_at FROM outbox LIMIT 0
--                   (every column; at start of `run` and in `check`)
--   read_pending:   SELECT o.id, o.aggregate_type, o.aggregate_id, o.event_type, o.payload,
--                   o.payload_bytes, o.headers, o.topic, o.event_id, o.created_at, o.shard
--                   FROM outbox o WHERE o.sent_at IS NULL AND o.parked_at IS NULL ...
--                   AND ($2 OR NOT EXISTS (SELECT 1 FROM outbox h WHERE h.parked_at ...)
--                        OR NOT EXISTS (SELECT 1 FROM outbox p WHERE p.aggregate_id = ...))
--   backlog_stats:  SELECT count(*) ... created_at ... FROM outbox WHERE sent_at / parked_at /
--                   discarded_at ...  (gauges, `check`; and pg_class.reltuples of
--                   outbox_pending_idx, which every role may read)
--   and the WHERE clauses of mark_sent, delete_sent and park below (id, sent_at,
--   parked_at, shard).
GRANT SELECT ON TABLE :"schema".outbox TO :"relay_role";

-- outbox, UPDATE of the park columns only:
--   park:           UPDATE outbox o SET parked_at = now(),
--                   park_reason = ($2::text[])[width_bucket(o.id, $1)], park_error = ...
--                   WHERE o.id = ANY($1) AND o.sent_at IS NULL AND o.parked_at IS NULL
GRANT UPDATE (parked_at, park_reason, park_error) ON TABLE :"schema".outbox TO :"relay_role";

\if :grant_mark
-- outbox, UPDATE of the ack columns only (relay.mode = "mark"):
--   mark_sent:      WITH fence AS (... FOR SHARE OF l) UPDATE outbox o SET sent_at = now(),
--                   kafka_partition = ($2::int[])[width_bucket(o.id, $1)], kafka_offset = ...
--                   WHERE o.id = ANY($1) AND o.sent_at IS NULL
--                   AND o.shard = (fenced shards)[width_bucket(o.shard, fenced shards)]
GRANT UPDATE (sent_at, kafka_partition, kafka_offset) ON TABLE :"schema".outbox TO :"relay_role";
\endif

\if :grant_delete
-- outbox, DELETE (relay.mode = "delete" with -v delete_mode=1; in mark mode, the retention
-- of sent rows unless -v keep_sent=1):
--   delete_sent:    WITH fence AS (... FOR SHARE OF l) DELETE FROM outbox o WHERE o.id = ANY($1)
--                   AND o.shard = (fenced shards)[width_bucket(o.shard, fenced shards)]
--   prune_sent:     DELETE FROM outbox o WHERE o.id = ANY(ARRAY(SELECT id FROM outbox
--                   WHERE sent_at IS NOT NULL AND sent_at < now() - $1 ORDER BY sent_at LIMIT $2))
GRANT DELETE ON TABLE :"schema".outbox TO :"relay_role";
\endif

-- outbox_shard_lease, SELECT (whole table; it holds no business data):
--   verify_schema:  SELECT shard, owner, epoch, expires_at FROM outbox_shard_lease LIMIT 0
--   mark_sent, delete_sent, renew_leases, acquire_leases, release_leases, still_held:
--                   read shard, owner, epoch, expires_at
--   next_lease_expiry: SELECT min(expires_at) ... FROM outbox_shard_lease
--   replica_status (`status`): owner, expires_at, renewed_at; count(*) of unowned shards
GRANT SELECT ON TABLE :"schema".outbox_shard_lease TO :"relay_role";

-- outbox_shard_lease, UPDATE of the lease columns (never shard, the key):
--   acquire_leases: ... FOR NO KEY UPDATE SKIP LOCKED) UPDATE outbox_shard_lease l
--                   SET owner, epoch = l.epoch + 1, expires_at, acquired_at, renewed_at
--   renew_leases:   ... FOR NO KEY UPDATE OF l) UPDATE ... SET expires_at, renewed_at
--   release_leases: UPDATE outbox_shard_lease l SET owner = NULL, expires_at = NULL
--   mark_sent, delete_sent: SELECT ... FROM outbox_shard_lease l ... FOR SHARE OF l
--                   (SELECT ... FOR SHARE / FOR NO KEY UPDATE needs UPDATE on at least one
--                   column of the locked table, in addition to SELECT)
GRANT UPDATE (owner, epoch, expires_at, acquired_at, renewed_at)
    ON TABLE :"schema".outbox_shard_lease TO :"relay_role";

-- outbox_replica, SELECT (whole table; replica ids and timestamps only):
--   verify_schema does not read it; heartbeat: SELECT replica_id FROM outbox_replica
--   WHERE expires_at > now() ..., RETURNING replica_id, and the ON CONFLICT (replica_id)
--   arbiter; replica_status (`status`): every column
GRANT SELECT ON TABLE :"schema".outbox_replica TO :"relay_role";

-- outbox_replica, INSERT and UPDATE of the heartbeat columns:
--   heartbeat:      INSERT INTO outbox_replica (replica_id, heartbeat_at, expires_at, state,
--                   state_reason) VALUES ... ON CONFLICT (replica_id) DO UPDATE
--                   SET heartbeat_at = now(), expires_at = ..., state = ..., state_reason = ...
--                   (started_at takes its default; state and state_reason, for `status`,
--                   are optional: without them the relay warns and relays all the same)
GRANT INSERT (replica_id, heartbeat_at, expires_at, state, state_reason)
    ON TABLE :"schema".outbox_replica TO :"relay_role";
GRANT UPDATE (heartbeat_at, expires_at, state, state_reason)
    ON TABLE :"schema".outbox_replica TO :"relay_role";

-- outbox_replica, DELETE:
--   deregister:     DELETE FROM outbox_replica WHERE replica_id = $1   (clean shutdown)
GRANT DELETE ON TABLE :"schema".outbox_replica TO :"relay_role";

----------------------------------------------------------------------------------------
-- Optional: the operator role, for `outbox-relay status` and `outbox-relay parked
-- list|replay|discard` (-v operator_role=outbox_relay_operator). A NOLOGIN group role:
-- grant it to the people (or the tooling role) who run those commands; they connect as
-- themselves (with schema in their search_path when it is not public). It sees no
-- payload, payload_bytes, headers or topic; it cannot mark, delete or insert rows.
--
-- The relay role above can already run `status`, `parked list` and `parked replay` (they
-- touch only columns it holds); `parked discard` needs this role's UPDATE of
-- discarded_at and discard_reason.
----------------------------------------------------------------------------------------
\if :want_operator

DO $$
DECLARE
    operator text := current_setting('outbox_relay.operator_role');
    relay    text := current_setting('outbox_relay.relay_role');
    r        pg_roles%ROWTYPE;
BEGIN
    IF operator = relay THEN
        RAISE EXCEPTION 'operator_role must differ from relay_role';
    END IF;
    SELECT * INTO r FROM pg_roles WHERE rolname = operator;
    IF NOT FOUND THEN
        EXECUTE format('CREATE ROLE %I NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE '
                       'NOREPLICATION NOBYPASSRLS', operator);
        RAISE NOTICE 'created role % (NOLOGIN: GRANT % TO <person>)', operator, operator;
    ELSIF r.rolsuper OR r.rolcreatedb OR r.rolcreaterole OR r.rolreplication OR r.rolbypassrls THEN
        RAISE EXCEPTION 'role % exists with SUPERUSER, CREATEDB, CREATEROLE, REPLICATION or BYPASSRLS', operator;
    END IF;
END
$$;

REVOKE ALL ON TABLE :"schema".outbox, :"schema".outbox_shard_lease, :"schema".outbox_replica
    FROM :"operator_role";
REVOKE CREATE ON SCHEMA :"schema" FROM :"operator_role";

GRANT CONNECT ON DATABASE :"dbname" TO :"operator_role";
GRANT USAGE ON SCHEMA :"schema" TO :"operator_role";

-- outbox, SELECT of the columns the commands read, no payloads:
--   backlog_stats (`status`): count(*), created_at, id WHERE sent_at, parked_at, discarded_at
--   list_parked (`parked list`): id, aggregate_type, aggregate_id, event_type, event_id,
--                   created_at, parked_at, park_reason, park_error
--                   WHERE parked_at, discarded_at, sent_at, aggregate_id
--   parked_ids (`parked replay|discard --aggregate/--all`): id WHERE the same
--   replay_parked, discard_parked: WHERE id, parked_at, discarded_at, sent_at
GRANT SELECT (id, aggregate_type, aggregate_id, event_type, event_id, created_at,
              sent_at, parked_at, park_reason, park_error, discarded_at)
    ON TABLE :"schema".outbox TO :"operator_role";

-- outbox, UPDATE:
--   replay_parked (`parked replay`):   SET parked_at = NULL, park_reason = NULL, park_error = NULL
--   discard_parked (`parked discard`): SET discarded_at = now(), discard_reason = $2
GRANT UPDATE (parked_at, park_reason, park_error, discarded_at, discard_reason)
    ON TABLE :"schema".outbox TO :"operator_role";

-- replica_status (`status`): outbox_replica r LEFT JOIN outbox_shard_lease l ...
--   r.replica_id, r.expires_at, r.started_at, r.heartbeat_at, r.state, r.state_reason;
--   l.shard, l.owner,
--   l.expires_at, l.renewed_at; count(*) FROM outbox_shard_lease WHERE owner / expires_at
GRANT SELECT ON TABLE :"schema".outbox_replica TO :"operator_role";
GRANT SELECT (shard, owner, expires_at, renewed_at) ON TABLE :"schema".outbox_shard_lease
    TO :"operator_role";

\endif

COMMIT;

-- What the roles hold now (PUBLIC's defaults not shown).
SELECT r.rolname AS role, 'database ' || d.datname AS object, a.privilege_type AS privilege,
       '' AS columns
FROM pg_database d
CROSS JOIN LATERAL aclexplode(d.datacl) a
JOIN pg_roles r ON r.oid = a.grantee
WHERE d.datname = current_database()
  AND r.rolname IN (:'relay_role', :'operator_role')
UNION ALL
SELECT r.rolname, 'schema ' || n.nspname, a.privilege_type, ''
FROM pg_namespace n
CROSS JOIN LATERAL aclexplode(n.nspacl) a
JOIN pg_roles r ON r.oid = a.grantee
WHERE n.nspname = :'schema'
  AND r.rolname IN (:'relay_role', :'operator_role')
UNION ALL
SELECT r.rolname, c.relname, a.privilege_type, '(whole table)'
FROM pg_class c
CROSS JOIN LATERAL aclexplode(c.relacl) a
JOIN pg_roles r ON r.oid = a.grantee
WHERE c.relnamespace = :'schema'::regnamespace
  AND r.rolname IN (:'relay_role', :'operator_role')
UNION ALL
SELECT r.rolname, c.relname, a.privilege_type,
       string_agg(att.attname, ', ' ORDER BY att.attnum)
FROM pg_attribute att
JOIN pg_class c ON c.oid = att.attrelid
CROSS JOIN LATERAL aclexplode(att.attacl) a
JOIN pg_roles r ON r.oid = a.grantee
WHERE c.relnamespace = :'schema'::regnamespace
  AND r.rolname IN (:'relay_role', :'operator_role')
GROUP BY r.rolname, c.relname, a.privilege_type
ORDER BY 1, 2, 3;
