-- messenger-streams history store, schema version 1.
-- Every row is keyed by an id that the processor derives from its input (event_id, outbox_id,
-- conversation_id), so writing the same topics twice leaves the same rows (see docs/history.md).

CREATE TABLE conversations (
    conversation_id          text PRIMARY KEY,
    page_id                  text NOT NULL,
    psid                     text NOT NULL,
    skill                    text NOT NULL,          -- the final skill (summary), else the newest seen
    skill_rank               text NOT NULL,          -- orders the facts that set `skill` (merge rule)
    skills                   text[] NOT NULL DEFAULT '{}',
    agents                   text[] NOT NULL DEFAULT '{}',
    locale                   text,
    ts_config                regconfig NOT NULL DEFAULT 'simple',  -- text search language of the conversation
    opened_by                text,
    started_at               timestamptz NOT NULL,   -- earliest event time seen (≈ opened_at)
    opened_at                timestamptz,
    last_event_at            timestamptz NOT NULL,
    closed_at                timestamptz,
    closed_by                text,
    close_reason             text,
    csat_score               smallint CHECK (csat_score BETWEEN 1 AND 5),
    first_agent_response_ms  bigint,
    queue_ms                 bigint,
    handle_ms                bigint,
    abandoned                boolean,
    consumer_messages        integer,
    agent_messages           integer,
    external_messages        integer,
    system_messages          integer,
    summary                  jsonb                   -- the summary as received on conversations.history
);
CREATE INDEX conversations_started ON conversations (started_at DESC, conversation_id DESC);
CREATE INDEX conversations_person ON conversations (page_id, psid);
CREATE INDEX conversations_page_started ON conversations (page_id, started_at DESC);
CREATE INDEX conversations_skills ON conversations USING gin (skills);
CREATE INDEX conversations_agents ON conversations USING gin (agents);
CREATE INDEX conversations_last_event ON conversations (last_event_at);
CREATE INDEX conversations_closed ON conversations (closed_at) WHERE closed_at IS NOT NULL;

CREATE TABLE messages (
    message_key      text PRIMARY KEY,               -- 'ob:<outbox_id>' for our sends, else the event_id
    event_id         text NOT NULL,
    type             text NOT NULL,                  -- consumer_message, postback, agent_message, ...
    author           text NOT NULL CHECK (author IN ('consumer', 'agent', 'system', 'external')),
    conversation_id  text,
    page_id          text NOT NULL,
    psid             text NOT NULL,
    skill            text NOT NULL,
    agent_id         text,
    mid              text,
    outbox_id        text,
    text             text,
    attachments      jsonb,
    sent_at          timestamptz NOT NULL,
    src_topic        text NOT NULL,
    src_partition    integer NOT NULL,
    src_offset       bigint NOT NULL,
    ts_config        regconfig NOT NULL DEFAULT 'simple',
    tsv              tsvector GENERATED ALWAYS AS (to_tsvector(ts_config, coalesce(text, ''))) STORED,
    data             jsonb NOT NULL DEFAULT '{}'    -- every other field of the event
);
CREATE INDEX messages_conversation ON messages (conversation_id, sent_at);
CREATE INDEX messages_person ON messages (page_id, psid, sent_at);
CREATE INDEX messages_tsv ON messages USING gin (tsv);
CREATE INDEX messages_sent ON messages (sent_at) WHERE conversation_id IS NULL;
CREATE INDEX messages_agent_sent ON messages (agent_id, sent_at) WHERE agent_id IS NOT NULL;

CREATE TABLE events (
    event_id         text PRIMARY KEY,
    type             text NOT NULL,                  -- any console event type, known or not
    conversation_id  text,
    page_id          text NOT NULL,
    psid             text,
    skill            text NOT NULL,
    at               timestamptz NOT NULL,
    agent_id         text,
    from_skill       text,
    to_skill         text,
    closed_by        text,
    reason           text,
    score            smallint,
    status           text,                           -- receipts: delivered / read
    watermark        timestamptz,                    -- receipts: everything sent before was delivered / read
    src_topic        text NOT NULL,
    src_partition    integer NOT NULL,
    src_offset       bigint NOT NULL,
    data             jsonb NOT NULL DEFAULT '{}'    -- every other field of the event
);
CREATE INDEX events_conversation ON events (conversation_id, at);
CREATE INDEX events_person ON events (page_id, psid);
CREATE INDEX events_receipts ON events (page_id, psid, status, watermark) WHERE type = 'status';
CREATE INDEX events_at ON events (at) WHERE conversation_id IS NULL;

CREATE TABLE csat_responses (
    conversation_id  text PRIMARY KEY,
    page_id          text NOT NULL,
    psid             text NOT NULL,
    skill            text NOT NULL,
    agent_id         text,
    score            smallint NOT NULL CHECK (score BETWEEN 1 AND 5),
    locale           text,
    at               timestamptz NOT NULL
);
CREATE INDEX csat_responses_person ON csat_responses (page_id, psid);
CREATE INDEX csat_responses_at ON csat_responses (at);

-- Text search languages in use: `q=` searches each with its own parser.
CREATE TABLE search_configs (
    ts_config        regconfig PRIMARY KEY
);
INSERT INTO search_configs VALUES ('simple');

-- People erased by `history forget`: a digest of "<page_id>:<psid>" (never the id itself) and
-- when. Records about them with an event time up to then are not written again.
CREATE TABLE forgotten (
    subject          text PRIMARY KEY,
    forgotten_at     timestamptz NOT NULL
);
-- Their erased conversations (a digest of the id): nothing about them is written again, whatever
-- its time (the processor's later events about a conversation it still had open, for instance).
CREATE TABLE forgotten_conversations (
    digest           text PRIMARY KEY,
    forgotten_at     timestamptz NOT NULL
);
