"""The directory's schema, one list for both engines.

`MIGRATIONS[i]` takes a directory from version i to i+1. A step's `common` SQL runs
on SQLite and PostgreSQL alike; what only one engine says is in its own part. Column
words in braces are spelled per engine (directory/sql/engine.py): `{name}` a name
compared without case, `{ref}` a column that refers to one, `{int}`, `{real}`, `{id}`.
A directory newer than the list is refused, not guessed at.
"""

from __future__ import annotations

from popguard.directory.sql.engine import Migration

NOTIFY_CHANNEL = "popguard_directory"

# What running services cache from the directory: a change to these wakes them
# (PostgreSQL's NOTIFY). copy_status and repairs are written every few seconds and no
# service caches them, so they stay quiet.
CACHED_TABLES = (
    "servers",
    "databases",
    "database_copies",
    "mailboxes",
    "pop_settings",
    "component_states",
    "monitoring_overrides",
    "monitor_repairing",
    "organization",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        common="""
        CREATE TABLE servers (
            name {name} PRIMARY KEY,
            roles TEXT NOT NULL,              -- JSON list: "mailbox", "frontend"
            address TEXT NOT NULL,
            ports TEXT NOT NULL               -- JSON map: endpoint -> TCP port
        );
        CREATE TABLE databases (
            name {name} PRIMARY KEY,
            created {real} NOT NULL
        );
        CREATE TABLE database_copies (
            database {ref} NOT NULL REFERENCES databases(name) ON DELETE CASCADE,
            server {ref} NOT NULL REFERENCES servers(name),
            activation_preference {int} NOT NULL,
            is_active {int} NOT NULL DEFAULT 0,
            PRIMARY KEY (database, server)
        );
        -- Exactly one mounted copy per database: the index makes a second one impossible.
        CREATE UNIQUE INDEX one_active_copy ON database_copies(database) WHERE is_active = 1;
        CREATE TABLE mailboxes (
            address {name} PRIMARY KEY,
            database {ref} NOT NULL REFERENCES databases(name),
            password_hash TEXT NOT NULL,
            created {real} NOT NULL,
            password_changed {real} NOT NULL
        );
        CREATE TABLE pop_settings (
            server {ref} PRIMARY KEY REFERENCES servers(name) ON DELETE CASCADE,
            settings TEXT NOT NULL,           -- JSON of PopSettings, only non-defaults
            revision {int} NOT NULL
        );
        """,
    ),
    Migration(
        common="""
        -- Server component states (Exchange's Set-ServerComponentState): one row per
        -- requester; a component is Inactive when any requester says so.
        CREATE TABLE component_states (
            server {ref} NOT NULL REFERENCES servers(name) ON DELETE CASCADE,
            component TEXT NOT NULL,
            requester TEXT NOT NULL,
            state TEXT NOT NULL,
            updated {real} NOT NULL,
            PRIMARY KEY (server, component, requester)
        );
        """
    ),
    Migration(
        sqlite="""
        UPDATE servers SET ports = json_set(ports, '$.replication', 64327)
            WHERE roles LIKE '%"mailbox"%';
        """,
        postgresql="""
        UPDATE servers SET ports = (ports::jsonb || '{"replication": 64327}'::jsonb)::text
            WHERE roles LIKE '%"mailbox"%';
        """,
        common="""
        -- Replication (continuous copies, switchover, failover).
        -- Set-MailboxServer's DatabaseCopyActivationDisabledAndMoveNow and
        -- DatabaseCopyAutoActivationPolicy.
        ALTER TABLE servers ADD COLUMN activation_disabled {int} NOT NULL DEFAULT 0;
        ALTER TABLE servers ADD COLUMN auto_activation_policy TEXT NOT NULL
            DEFAULT 'Unrestricted';
        -- A move in progress: who claimed it and when. Two moves of one database at
        -- once cannot both claim it; a claim older than MOVE_CLAIM_TIMEOUT is stale.
        ALTER TABLE databases ADD COLUMN move_claim TEXT;
        ALTER TABLE databases ADD COLUMN move_claimed {real};
        -- What each copy's replication service last reported about it.
        CREATE TABLE copy_status (
            database {ref} NOT NULL,
            server {ref} NOT NULL,
            status TEXT NOT NULL,
            copy_queue_length {int} NOT NULL,
            replay_queue_length {int} NOT NULL,
            applied_lsn {int} NOT NULL,
            last_inspected_log_time {real},
            error TEXT,
            reported {real} NOT NULL,
            PRIMARY KEY (database, server),
            FOREIGN KEY (database, server) REFERENCES database_copies(database, server)
                ON DELETE CASCADE
        );
        """,
    ),
    Migration(
        # The health service's HTTP API, on every server.
        sqlite="UPDATE servers SET ports = json_set(ports, '$.health', 8480);",
        postgresql="""
        UPDATE servers SET ports = (ports::jsonb || '{"health": 8480}'::jsonb)::text;
        """,
    ),
    Migration(
        common="""
        -- Monitoring overrides (Add-ServerMonitoringOverride, Add-GlobalMonitoringOverride):
        -- server is NULL for a global one. They expire on their own.
        CREATE TABLE monitoring_overrides (
            id {id},
            server {ref} REFERENCES servers(name) ON DELETE CASCADE,
            identity {name} NOT NULL,                -- HealthSet\\Item
            item_type TEXT NOT NULL,                 -- Probe | Monitor
            property_name TEXT NOT NULL,
            property_value TEXT NOT NULL,
            created {real} NOT NULL,
            expires {real} NOT NULL
        );
        -- Set-ServerMonitor -Repairing: an operator says a monitor is being worked on.
        CREATE TABLE monitor_repairing (
            server {ref} NOT NULL REFERENCES servers(name) ON DELETE CASCADE,
            identity {name} NOT NULL,
            since {real} NOT NULL,
            PRIMARY KEY (server, identity)
        );
        """
    ),
    Migration(
        common="""
        -- Repairs the health engines made, shared by every server so that a group
        -- throttle (at most N a day across the servers of a role; enough others in
        -- service) holds.
        CREATE TABLE repairs (
            id {id},
            server {ref} NOT NULL REFERENCES servers(name) ON DELETE CASCADE,
            role TEXT NOT NULL,
            kind TEXT NOT NULL,
            service TEXT NOT NULL,
            started {real} NOT NULL
        );
        CREATE INDEX repairs_by_role ON repairs(role, started);
        """
    ),
    Migration(
        common="""
        -- One random name per organization, made with its directory: what popguard's
        -- own clients check, where no certificate can (LMTP), so that they never hand
        -- mail to another organization that listens on the same address.
        CREATE TABLE organization (
            id TEXT NOT NULL
        );
        """,
        sqlite="INSERT INTO organization (id) VALUES (lower(hex(randomblob(8))));",
        postgresql="""
        INSERT INTO organization (id)
            VALUES (substr(replace(gen_random_uuid()::text, '-', ''), 1, 16));
        """,
    ),
    Migration(
        # SQLite's PRAGMA data_version already tells another process's commit.
        postgresql="""
        CREATE FUNCTION popguard_directory_changed() RETURNS trigger
            LANGUAGE plpgsql AS $body$
        BEGIN
            PERFORM pg_notify('"""
        + NOTIFY_CHANNEL
        + """', TG_TABLE_NAME);
            RETURN NULL;
        END
        $body$;
        """
        + "".join(
            f"CREATE TRIGGER {table}_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE "
            f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION popguard_directory_changed();\n"
            for table in CACHED_TABLES
        ),
    ),
    Migration(
        common="""
        -- Active Manager. A lease per mailbox server, renewed by its replication
        -- service, and per deciding role ('ActiveManager'); expiry is judged by the
        -- directory's clock only, so no host's clock can make or stop a failover.
        CREATE TABLE leases (
            kind TEXT NOT NULL,                  -- server | role
            name {name} NOT NULL,                -- the server, or the role
            holder {ref} NOT NULL REFERENCES servers(name) ON DELETE CASCADE,
            expires {real} NOT NULL,             -- directory clock, seconds
            renewed {real} NOT NULL,
            PRIMARY KEY (kind, name)
        );
        -- The fencing token of a database's active copy: every activation adds one.
        ALTER TABLE databases ADD COLUMN epoch {int} NOT NULL DEFAULT 0;
        """
    ),
    Migration(
        # Mail in follows the active copy: a mailbox server hands mail for a database
        # active elsewhere to that server's delivery on this port (LMTP, mutual TLS).
        sqlite="""
        UPDATE servers SET ports = json_set(ports, '$."lmtp-peer"', 2425)
            WHERE roles LIKE '%"mailbox"%';
        """,
        postgresql="""
        UPDATE servers SET ports = (ports::jsonb || '{"lmtp-peer": 2425}'::jsonb)::text
            WHERE roles LIKE '%"mailbox"%';
        """,
    ),
    Migration(
        # A passive copy the active copy's acknowledgements wait for (any one of them):
        # Active Manager fails a database over by itself only to such a copy, since only
        # it is known to hold every message acknowledged. Written by the active copy's
        # replication service; every activation clears it.
        common="""
        ALTER TABLE database_copies ADD COLUMN synchronous {int} NOT NULL DEFAULT 0;
        """
    ),
    Migration(
        # The operator's web page (popguard serve web) on each front end, its users, and
        # what they did there (the event feed shows who did what, and why).
        sqlite="""
        UPDATE servers SET ports = json_set(ports, '$.web', 8088)
            WHERE roles LIKE '%"frontend"%';
        """,
        postgresql="""
        UPDATE servers SET ports = (ports::jsonb || '{"web": 8088}'::jsonb)::text
            WHERE roles LIKE '%"frontend"%';
        """,
        common="""
        CREATE TABLE web_users (
            name {name} PRIMARY KEY,
            role TEXT NOT NULL,                -- operator | viewer
            password_hash TEXT NOT NULL,       -- argon2id, as a mailbox's
            created {real} NOT NULL
        );
        CREATE TABLE web_actions (
            id {id},
            at {real} NOT NULL,
            user_name TEXT NOT NULL,
            action TEXT NOT NULL,              -- invoke-monitoringprobe, restart-service, ...
            target TEXT NOT NULL,
            reason TEXT NOT NULL,
            result TEXT NOT NULL
        );
        CREATE INDEX web_actions_by_time ON web_actions(at);
        """,
    ),
    Migration(
        common="""
        -- Quotas (Exchange's ProhibitSendReceiveQuota, in octets; NULL: unlimited). A
        -- mailbox uses its database's unless use_database_quota_defaults is 0.
        ALTER TABLE databases ADD COLUMN prohibit_send_receive_quota {int};
        ALTER TABLE mailboxes ADD COLUMN prohibit_send_receive_quota {int};
        ALTER TABLE mailboxes ADD COLUMN use_database_quota_defaults {int} NOT NULL DEFAULT 1;
        -- Each copy's sizes as its replication service last measured them (NULL: not
        -- yet): its files, its live messages' octets, its change log's pages.
        ALTER TABLE copy_status ADD COLUMN database_size {int};
        ALTER TABLE copy_status ADD COLUMN message_bytes {int};
        ALTER TABLE copy_status ADD COLUMN log_bytes {int};
        """
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)
