pub mod dbus;
pub mod systemd1_double;
