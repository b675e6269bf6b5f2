//! outbox-relay: publishes committed rows of a PostgreSQL outbox table to Kafka, keyed by
//! aggregate id, acks=all on an idempotent producer, marking each row only after its ack.

#![warn(unreachable_pub)]

pub mod app;
pub mod build;
pub mod cli;
pub mod config;
mod encode;
pub mod http;
mod kafka;
mod lease;
pub mod model;
mod proof;
pub mod relay;
pub mod retention;
pub mod store;
mod systemd;
pub mod telemetry;
mod wake;

pub use app::App;
pub use config::Settings;
