//! QEMU's jobs as `blockdev-create` makes them: each runs on its own thread, reports its
//! status changes as `JOB_STATUS_CHANGE` events, and stays (concluded) until
//! `job-dismiss`, as QEMU's create jobs (`JOB_MANUAL_DISMISS`, finalized automatically).

use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};

/// A job's status, as QMP names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobStatus {
    /// Just made.
    Created,
    /// Its work is under way.
    Running,
    /// Done, waiting for the other jobs of its transaction.
    Waiting,
    /// Ready to be finalized.
    Pending,
    /// Failed or cancelled, cleaning up.
    Aborting,
    /// Finished; waits for `job-dismiss`.
    Concluded,
    /// Dismissed.
    Null,
}

impl JobStatus {
    fn name(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }
}

/// A verb a client applies to a job (`job-VERB`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobVerb {
    /// `job-cancel`.
    Cancel,
    /// `job-complete`.
    Complete,
    /// `job-finalize`.
    Finalize,
    /// `job-dismiss`.
    Dismiss,
}

impl JobVerb {
    /// Its name in QEMU's errors.
    fn name(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
        }
    }

    /// The QMP command.
    pub fn command(self) -> &'static str {
        match self {
            JobVerb::Cancel => "job-cancel",
            JobVerb::Complete => "job-complete",
            JobVerb::Finalize => "job-finalize",
            JobVerb::Dismiss => "job-dismiss",
        }
    }

    /// QEMU's verb table (job.c `JobVerbTable`): whether the verb applies in `s`.
    fn allowed(self, s: JobStatus) -> bool {
        use JobStatus::*;
        match self {
            JobVerb::Cancel => matches!(s, Created | Running | Waiting | Pending),
            // Only READY jobs complete; create jobs never are.
            JobVerb::Complete => false,
            JobVerb::Finalize => s == Pending,
            JobVerb::Dismiss => s == Concluded,
        }
    }
}

/// Why a job command was refused (QEMU's texts).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// `job-id` is already taken.
    #[error("Job ID '{0}' already in use")]
    InUse(String),
    /// `job-id` is not a well-formed id.
    #[error("Invalid job ID '{0}'")]
    BadId(String),
    /// No job of that id.
    #[error("Job not found")]
    NotFound,
    /// The verb does not apply in the job's state.
    #[error("Job '{id}' in state '{state}' cannot accept command verb '{verb}'")]
    BadVerb {
        /// The job.
        id: String,
        /// Its status.
        state: &'static str,
        /// The verb.
        verb: &'static str,
    },
}

struct Job {
    id: String,
    status: JobStatus,
    cancelled: bool,
    done: bool,
    error: Option<String>,
}

/// Where status changes go (the QMP event bus).
pub type Emit = Arc<dyn Fn(&str, Value) + Send + Sync>;

/// The VM's jobs.
pub struct Jobs {
    jobs: Arc<Mutex<Vec<Job>>>,
    emit: Emit,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.`, `_`.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn set(jobs: &mut [Job], emit: &Emit, id: &str, status: JobStatus) {
    if let Some(j) = jobs.iter_mut().find(|j| j.id == id) {
        j.status = status;
        emit(
            "JOB_STATUS_CHANGE",
            json!({"status": status.name(), "id": id}),
        );
    }
}

impl Jobs {
    /// No jobs; status changes go to `emit`.
    pub fn new(emit: Emit) -> Self {
        Jobs {
            jobs: Arc::default(),
            emit,
        }
    }

    /// Starts a create job `id` that runs `work` on its own thread (created and
    /// running are reported before this returns, as QEMU does).
    pub fn start(
        &self,
        id: &str,
        work: Box<dyn FnOnce() -> Result<(), String> + Send>,
    ) -> Result<(), JobError> {
        if !id_wellformed(id) {
            return Err(JobError::BadId(id.to_string()));
        }
        {
            let mut jobs = lock(&self.jobs);
            if jobs.iter().any(|j| j.id == id) {
                return Err(JobError::InUse(id.to_string()));
            }
            jobs.push(Job {
                id: id.to_string(),
                status: JobStatus::Created,
                cancelled: false,
                done: false,
                error: None,
            });
            (self.emit)("JOB_STATUS_CHANGE", json!({"status": "created", "id": id}));
            set(&mut jobs, &self.emit, id, JobStatus::Running);
        }
        let jobs = Arc::clone(&self.jobs);
        let emit = Arc::clone(&self.emit);
        let job_id = id.to_string();
        let thread = std::thread::Builder::new()
            .name("job".into())
            .spawn(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                    .unwrap_or_else(|_| Err("internal error in the job".into()));
                let mut jobs = lock(&jobs);
                let Some(job) = jobs.iter_mut().find(|j| j.id == job_id) else {
                    return;
                };
                job.done = true;
                let result = if job.cancelled {
                    Err("Operation canceled".to_string())
                } else {
                    result
                };
                match result {
                    Ok(()) => {
                        set(&mut jobs, &emit, &job_id, JobStatus::Waiting);
                        set(&mut jobs, &emit, &job_id, JobStatus::Pending);
                    }
                    Err(e) => {
                        if let Some(j) = jobs.iter_mut().find(|j| j.id == job_id) {
                            j.error = Some(e);
                        }
                        set(&mut jobs, &emit, &job_id, JobStatus::Aborting);
                    }
                }
                set(&mut jobs, &emit, &job_id, JobStatus::Concluded);
            });
        if thread.is_err() {
            let mut jobs = lock(&self.jobs);
            if let Some(j) = jobs.iter_mut().find(|j| j.id == id) {
                j.error = Some("could not start the job's thread".into());
                j.done = true;
            }
            set(&mut jobs, &self.emit, id, JobStatus::Aborting);
            set(&mut jobs, &self.emit, id, JobStatus::Concluded);
        }
        Ok(())
    }

    /// Applies `verb` to job `id`.
    pub fn apply(&self, verb: JobVerb, id: &str) -> Result<(), JobError> {
        let mut jobs = lock(&self.jobs);
        let job = jobs
            .iter_mut()
            .find(|j| j.id == id)
            .ok_or(JobError::NotFound)?;
        if !verb.allowed(job.status) {
            return Err(JobError::BadVerb {
                id: id.to_string(),
                state: job.status.name(),
                verb: verb.name(),
            });
        }
        match verb {
            JobVerb::Dismiss => {
                set(&mut jobs, &self.emit, id, JobStatus::Null);
                jobs.retain(|j| j.id != id);
            }
            // The work runs to its end; its result is then discarded.
            JobVerb::Cancel => job.cancelled = true,
            JobVerb::Complete | JobVerb::Finalize => {}
        }
        Ok(())
    }

    /// `query-jobs`.
    pub fn query(&self) -> Value {
        let jobs = lock(&self.jobs);
        Value::Array(
            // Newest first, as QEMU's job list.
            jobs.iter()
                .rev()
                .map(|j| {
                    let mut v = json!({
                        "current-progress": u64::from(j.done),
                        "status": j.status.name(),
                        "total-progress": 1,
                        "type": "create",
                        "id": j.id,
                    });
                    if let Some(e) = &j.error {
                        v["error"] = json!(e);
                    }
                    v
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_create_job_lives_until_dismissed() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        let jobs = Jobs::new(Arc::new(move |_: &str, d: Value| {
            lock(&s).push(d["status"].as_str().unwrap_or("").to_string())
        }));
        assert_eq!(
            jobs.start("a b", Box::new(|| Ok(()))),
            Err(JobError::BadId("a b".into()))
        );
        jobs.start("j1", Box::new(|| Err("boom".into()))).unwrap();
        assert_eq!(
            jobs.start("j1", Box::new(|| Ok(())))
                .unwrap_err()
                .to_string(),
            "Job ID 'j1' already in use"
        );
        while jobs.query()[0]["status"] != "concluded" {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(jobs.query()[0]["error"], "boom");
        assert_eq!(
            jobs.apply(JobVerb::Cancel, "j1").unwrap_err().to_string(),
            "Job 'j1' in state 'concluded' cannot accept command verb 'cancel'"
        );
        jobs.apply(JobVerb::Dismiss, "j1").unwrap();
        assert_eq!(jobs.apply(JobVerb::Dismiss, "j1"), Err(JobError::NotFound));
        assert_eq!(
            *lock(&seen),
            ["created", "running", "aborting", "concluded", "null"]
        );
    }
}
