//! Replies about jobs: `query-jobs` (any job) and `query-block-jobs` (block jobs, with speed and offsets).
//!
//! qmpbak creates jobs with `auto-dismiss: false`, so a concluded job stays in `query-jobs` with its error until
//! it is dismissed.

use serde::{Deserialize, Serialize};

use super::enums::{BlockDeviceIoStatus, JobStatus, JobType};

/// One entry of `query-jobs` (`JobInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    pub id: String,
    #[serde(rename = "type")]
    pub job_type: JobType,
    pub status: JobStatus,
    /// Progress in units of `total_progress`; both can change while the job runs.
    #[serde(default)]
    pub current_progress: u64,
    #[serde(default)]
    pub total_progress: u64,
    /// Why the job failed; set once it is concluded (or aborting) after an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One entry of `query-block-jobs` (`BlockJobInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobInfo {
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// The job id (named `device` for history's sake).
    pub device: String,
    #[serde(default)]
    pub len: u64,
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub busy: bool,
    #[serde(default)]
    pub paused: bool,
    /// Rate limit in bytes per second, 0 for none.
    #[serde(default)]
    pub speed: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_status: Option<BlockDeviceIoStatus>,
    /// Whether a mirror or active commit can be completed.
    #[serde(default)]
    pub ready: bool,
    #[serde(default = "undefined")]
    pub status: JobStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_finalize: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn undefined() -> JobStatus {
    JobStatus::Undefined
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_info_with_error_and_unknown_type() {
        let json = r#"{"current-progress": 3, "status": "concluded", "total-progress": 8, "type": "teleport",
            "id": "j1", "error": "No space left on device"}"#;
        let job: JobInfo = serde_json::from_str(json).unwrap();
        assert_eq!(job.job_type, JobType::Unknown("teleport".into()));
        assert_eq!(job.status, JobStatus::Concluded);
        assert_eq!(job.error.as_deref(), Some("No space left on device"));
    }

    #[test]
    fn block_job_info() {
        let json = r#"{"auto-finalize": true, "io-status": "ok", "device": "b0", "auto-dismiss": false,
            "busy": true, "len": 1048576, "offset": 4096, "status": "running", "paused": false, "speed": 0,
            "ready": false, "type": "backup"}"#;
        let job: BlockJobInfo = serde_json::from_str(json).unwrap();
        assert_eq!(job.device, "b0");
        assert_eq!(job.job_type, JobType::Backup);
        assert_eq!(job.auto_dismiss, Some(false));
    }
}
