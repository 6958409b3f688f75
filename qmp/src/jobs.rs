//! Waiting for jobs: until they conclude (`wait_job`) or reach a state (`wait_job_status`), and dismissing
//! them.
//!
//! A wait subscribes to `JOB_STATUS_CHANGE` first and asks `query-jobs` second, so a job that changed state
//! before the wait began is seen by the query, and one that changes after it by the events.

use std::time::Duration;

use tokio::time::Instant;

use crate::client::Qmp;
use crate::commands::{JobDismiss, QueryJobs};
use crate::error::Error;
use crate::events::EventFilter;
use crate::types::{JobInfo, JobStatus, JobType};

/// How a job ended, read from `query-jobs` once it concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    pub id: String,
    pub job_type: JobType,
    /// `Concluded`, or `Null` if the job was dismissed before its outcome could be read (then `error` is
    /// unknown and `None`).
    pub status: JobStatus,
    /// Why the job failed; `None` if it succeeded.
    pub error: Option<String>,
    pub current_progress: u64,
    pub total_progress: u64,
}

impl JobOutcome {
    /// Whether the job concluded without an error.
    pub fn succeeded(&self) -> bool {
        self.status == JobStatus::Concluded && self.error.is_none()
    }

    /// The outcome of a job that is gone; what was last known of it fills the rest.
    fn gone(id: &str, last: Option<JobInfo>) -> JobOutcome {
        let (job_type, current_progress, total_progress) = last
            .map_or((JobType::Unknown(String::new()), 0, 0), |j| {
                (j.job_type, j.current_progress, j.total_progress)
            });
        JobOutcome {
            id: id.to_owned(),
            job_type,
            status: JobStatus::Null,
            error: None,
            current_progress,
            total_progress,
        }
    }
}

impl From<JobInfo> for JobOutcome {
    fn from(job: JobInfo) -> JobOutcome {
        JobOutcome {
            id: job.id,
            job_type: job.job_type,
            status: job.status,
            error: job.error,
            current_progress: job.current_progress,
            total_progress: job.total_progress,
        }
    }
}

/// Where a watch ended: the status reached and the job as the first query saw it.
struct Watched {
    status: JobStatus,
    first: Option<JobInfo>,
}

impl Qmp {
    /// Waits until job `id` concludes (or disappears) and returns its outcome. A job that concluded before the
    /// call is reported at once. Fails with `JobNotFound` if QEMU has no such job, `Timeout` after `timeout`.
    pub async fn wait_job(&self, id: &str, timeout: Duration) -> crate::Result<JobOutcome> {
        let deadline = Instant::now() + timeout;
        let watched = self
            .watch_job(id, JobStatus::is_finished, "conclude", deadline, timeout)
            .await?;
        if watched.status == JobStatus::Null {
            return Ok(JobOutcome::gone(id, watched.first));
        }
        if let Some(job) = watched
            .first
            .as_ref()
            .filter(|j| j.status == JobStatus::Concluded)
        {
            return Ok(JobOutcome::from(job.clone()));
        }
        // Concluded by event: the error message is only in query-jobs.
        match self.job_info(id).await? {
            Some(job) => Ok(JobOutcome::from(job)),
            None => Ok(JobOutcome::gone(id, watched.first)),
        }
    }

    /// Waits until job `id` is in one of the `wanted` states (e.g. `Pending` for a job started with
    /// `auto-finalize: false`, `Ready` for a mirror) and returns that state. If the job finishes first, returns
    /// `Concluded` or `Null` instead, so a failed job does not hold the caller until the timeout; check the
    /// result, and use `wait_job` to read the error.
    pub async fn wait_job_status(
        &self,
        id: &str,
        wanted: &[JobStatus],
        timeout: Duration,
    ) -> crate::Result<JobStatus> {
        let names: Vec<&str> = wanted.iter().map(JobStatus::as_str).collect();
        let goal = format!("become {}", names.join(" or "));
        let deadline = Instant::now() + timeout;
        let watched = self
            .watch_job(id, |s| wanted.contains(s), &goal, deadline, timeout)
            .await?;
        Ok(watched.status)
    }

    /// Dismisses concluded job `id`, after which its outcome is gone. `JobNotFound` if QEMU has no such job.
    pub async fn dismiss_job(&self, id: &str) -> crate::Result<()> {
        match self.execute(&JobDismiss::new(id)).await {
            Ok(_) => Ok(()),
            Err(refused @ Error::Qmp { .. }) => match self.job_info(id).await {
                Ok(None) => Err(Error::JobNotFound { id: id.to_owned() }),
                _ => Err(refused),
            },
            Err(e) => Err(e),
        }
    }

    /// Job `id` as `query-jobs` reports it, `None` if there is no such job.
    pub async fn job_info(&self, id: &str) -> crate::Result<Option<JobInfo>> {
        self.job_info_timeout(id, self.command_timeout()).await
    }

    async fn job_info_timeout(&self, id: &str, timeout: Duration) -> crate::Result<Option<JobInfo>> {
        let jobs = self.execute_timeout(&QueryJobs, timeout).await?;
        Ok(jobs.into_iter().find(|j| j.id == id))
    }

    /// Follows job `id` until `done` accepts its status or it finishes.
    async fn watch_job(
        &self,
        id: &str,
        done: impl Fn(&JobStatus) -> bool,
        goal: &str,
        deadline: Instant,
        timeout: Duration,
    ) -> crate::Result<Watched> {
        let mut events = self.subscribe(EventFilter::names(&["JOB_STATUS_CHANGE"]).job(id));
        let query_timeout = deadline
            .saturating_duration_since(Instant::now())
            .min(self.command_timeout());
        let first = self.job_info_timeout(id, query_timeout).await?;
        let mut status = if let Some(job) = &first {
            job.status.clone()
        } else {
            // Not listed: unknown, unless it changed between subscribing and the query (then it is gone now,
            // and the last queued event says how it ended).
            let mut latest = None;
            while let Some(event) = events.try_next() {
                latest = event.job_status().or(latest);
            }
            latest.ok_or_else(|| Error::JobNotFound { id: id.to_owned() })?
        };
        loop {
            if done(&status) || status.is_finished() {
                return Ok(Watched { status, first });
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            match events.next_timeout(remaining).await {
                Ok(event) => {
                    if let Some(next) = event.job_status() {
                        status = next;
                    }
                }
                Err(Error::Timeout { .. }) => {
                    let what = format!("job {id} to {goal} (it is {status})");
                    return Err(Error::Timeout { what, after: timeout });
                }
                Err(e) => return Err(e),
            }
        }
    }
}
