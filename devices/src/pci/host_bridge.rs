//! The host bridge at 00:00.0: a type-0 function with class "host bridge",
//! no BARs and no interrupt, present so that the guest finds bus 0.

use super::config::{PciConfiguration, PciIds};
use super::PciDevice;

/// Intel's vendor ID, as virtual host bridges commonly use.
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
/// The device ID Cloud Hypervisor uses for its virtual host bridge.
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0d57;
/// Class code: bridge (0x06), host bridge (0x00), interface 0.
const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;

/// The PCI host bridge function.
#[derive(Debug, Clone)]
pub struct PciHostBridge {
    config: PciConfiguration,
}

impl PciHostBridge {
    /// A host bridge with the default IDs.
    pub fn new() -> Self {
        let ids = PciIds {
            vendor: HOST_BRIDGE_VENDOR_ID,
            device: HOST_BRIDGE_DEVICE_ID,
            revision: 0,
            class: CLASS_HOST_BRIDGE,
            subsystem_vendor: 0,
            subsystem: 0,
        };
        Self {
            config: PciConfiguration::new(ids, 0),
        }
    }
}

impl Default for PciHostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for PciHostBridge {
    fn read_config(&mut self, reg: usize, offset: u64, data: &mut [u8]) {
        self.config.read(reg, offset, data);
    }

    fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write(reg, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifies_as_a_host_bridge() {
        let mut hb = PciHostBridge::new();
        let mut d = [0u8; 4];
        hb.read_config(0, 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086);
        hb.read_config(2, 0, &mut d);
        assert_eq!(u32::from_le_bytes(d) >> 8, 0x06_00_00);
        hb.read_config(3, 2, &mut d[..1]);
        assert_eq!(d[0], 0, "header type 0, single function");
        hb.write_config(0, 0, &[0; 4]);
        hb.read_config(0, 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086);
        assert!(hb.bar_regions().is_empty());
    }
}
