//! Commands that tell an admin what egress is and would do, without routing anything:
//! `check-config`, `explain`, `status` and `doctor`.

pub mod check_config;
pub mod doctor;
pub mod explain;
pub mod status;
