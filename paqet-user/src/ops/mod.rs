//! Operator commands: `paqet check` (the troubleshooting list, automated) and
//! `paqet status` (what is attached, and its counters).

pub mod check;
pub mod limits;
pub mod live;
pub mod privileges;
pub mod status;
