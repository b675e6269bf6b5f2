//! outbox-relay: publishes committed rows of a PostgreSQL outbox table to Kafka, keyed by
//! aggregate id, acks=all on an idempotent producer, marking each row only after its ack.

pub mod app;
pub mod cli;
pub mod config;
pub mod encode;
pub mod http;
pub mod kafka;
pub mod lease;
pub mod model;
pub mod relay;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod wake;

pub use app::App;
pub use config::Settings;
