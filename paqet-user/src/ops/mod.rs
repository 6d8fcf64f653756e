//! Operator commands: `paqet check` (the troubleshooting list, automated) and
//! `paqet status` (what is attached, and its counters), and the counters a running
//! relay publishes (`live`) and serves to Prometheus (`metrics`), and the man page and
//! shell completions (`manual`).

pub mod check;
pub mod heap;
pub mod limits;
pub mod live;
pub mod manual;
pub mod metrics;
pub mod privileges;
pub mod status;
