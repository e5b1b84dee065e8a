//! ACPI platform devices for a hardware-reduced ACPI machine: the Generic
//! Event Device (GED), which carries the power button and PCI hotplug
//! events, the FADT's sleep control/status and reset registers, and the ACPI
//! PCI hotplug register block.

mod ged;
mod pcihp;

pub use ged::{
    Ged, PowerEvent, GED_EVENT, GED_EVENT_PCI_HOTPLUG, GED_EVENT_POWER_BUTTON, GED_LEN, GED_RESET,
    GED_RESET_VALUE, GED_SLEEP_CONTROL, GED_SLEEP_STATUS, SLEEP_CONTROL_SLP_EN,
    SLEEP_STATUS_WAK_STS, SLEEP_TYPE_S5,
};
pub use pcihp::{
    PciHotplug, PCIHP_B0EJ, PCIHP_LEN, PCIHP_PCID, PCIHP_PCIU, PCIHP_PSEG, PCIHP_SLOTS,
};
