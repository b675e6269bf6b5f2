//! Test harness shared by the test binaries, split by concern; each binary uses a subset.
#![allow(dead_code)]

mod kafka;
mod oracle;
mod postgres;
mod process;
mod relay;
mod tls;

// Re-exported flat, so that test binaries keep `use support::*;`. A binary that uses nothing
// of one module would see its re-export as unused, as it sees unused items (`dead_code`).
#[allow(unused_imports)]
pub use kafka::*;
#[allow(unused_imports)]
pub use oracle::*;
#[allow(unused_imports)]
pub use postgres::*;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use relay::*;
#[allow(unused_imports)]
pub use tls::*;
