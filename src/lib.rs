//! outbox-relay: publishes committed rows of a PostgreSQL outbox table to Kafka, keyed by
//! aggregate id, acks=all on an idempotent producer, marking each row only after its ack.

pub mod app;
pub mod classify;
pub mod cli;
pub mod config;
pub mod encode;
pub mod http;
pub mod lease;
pub mod model;
pub mod produce;
pub mod relay;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod topics;
pub mod waiting;
pub mod wake;

pub use app::App;
pub use config::Settings;
