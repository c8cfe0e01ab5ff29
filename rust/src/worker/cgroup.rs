//! TEMPORARY stand-in until the cgroup change lands.

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    pub memory_max: Option<u64>,
    pub cpu_max: Option<f64>,
    pub pids_max: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CgroupError(String);

pub struct VmCgroup;

impl VmCgroup {
    pub fn create(_name: &str, _limits: &Limits) -> Result<Option<VmCgroup>, CgroupError> {
        Ok(None)
    }
    pub fn add_process(&self, _pid: libc::pid_t) -> Result<(), CgroupError> {
        Ok(())
    }
    pub fn oom_killed(&self) -> bool {
        false
    }
    pub fn remove(self) {}
}
