//! virtio-vsock (placeholder until the user-space backend lands).

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock is not implemented yet ({0})")]
    Unsupported(String),
}

pub struct Vsock;

impl Vsock {
    pub fn new(path: &Path) -> Result<Box<Self>, VsockError> {
        Err(VsockError::Unsupported(path.display().to_string()))
    }
}

impl super::VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        19
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256, 256, 256]
    }
    fn features(&self) -> u64 {
        super::VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: usize, _data: &mut [u8]) {}
    fn config_len(&self) -> usize {
        0
    }
    fn activate(
        &mut self,
        _mem: vm_memory::GuestMemoryMmap,
        _queues: Vec<super::Queue>,
        _interrupt: std::sync::Arc<super::Interrupt>,
    ) -> Result<(), String> {
        Err("unsupported".into())
    }
    fn notify(&mut self, _index: u16) {}
    fn reset(&mut self) {}
}
