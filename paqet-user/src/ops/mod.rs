//! Operator commands: `paqet check` (the troubleshooting list, automated) and
//! `paqet status` (what is attached, and its counters), and the counters a running
//! relay publishes (`live`) and serves to Prometheus (`metrics`).

pub mod check;
pub mod limits;
pub mod live;
pub mod metrics;
pub mod privileges;
pub mod status;
