//! ACPI platform devices for a hardware-reduced ACPI machine: the Generic
//! Event Device (GED), which carries the power button and (later) PCI
//! hotplug events, and the FADT's sleep control/status and reset registers.

mod ged;

pub use ged::{
    Ged, PowerEvent, GED_EVENT, GED_EVENT_PCI_HOTPLUG, GED_EVENT_POWER_BUTTON, GED_LEN, GED_RESET,
    GED_RESET_VALUE, GED_SLEEP_CONTROL, GED_SLEEP_STATUS, SLEEP_CONTROL_SLP_EN,
    SLEEP_STATUS_WAK_STS, SLEEP_TYPE_S5,
};
