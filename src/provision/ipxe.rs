//! The iPXE scripts `serve` answers, in the shape Matchbox gives them, so
//! that a site's existing DHCP/TFTP chain to Matchbox works unchanged
//! against `serve`, and the kernel command line both share with the
//! Matchbox profiles `render matchbox` writes.

use crate::config::MacAddr;

/// What every iPXE client is first pointed at: a relative chain, so the
/// script works whatever address or name the client reached us by.
pub const BOOT_SCRIPT: &str = "#!ipxe\nchain ipxe?mac=${mac:hexhyp}\n";

/// `52-54-00-aa-bb-01`: iPXE's `${mac:hexhyp}`, also safe in a file name.
pub fn mac_hyphens(mac: &MacAddr) -> String {
    mac.to_string().replace(':', "-")
}

/// Flatcar's PXE kernel command line: first boot (so Ignition runs), where
/// Ignition fetches its config, and the consoles a rack's serial-over-LAN
/// and a crash cart both see.
pub fn kernel_args(initrd_name: &str, ignition_url: &str) -> Vec<String> {
    vec![
        // UEFI iPXE hands the kernel its initrd by this name.
        format!("initrd={initrd_name}"),
        "flatcar.first_boot=1".to_string(),
        format!("ignition.config.url={ignition_url}"),
        "console=tty0".to_string(),
        "console=ttyS0,115200n8".to_string(),
    ]
}

/// The script for one machine: its kernel and initrd from `assets_url`,
/// its Ignition pointer from `ignition_url`.
pub fn node_script(assets_url: &str, kernel: &str, initrd: &str, ignition_url: &str) -> String {
    let initrd_name = initrd.rsplit('/').next().unwrap_or(initrd);
    format!(
        "#!ipxe\nkernel {assets_url}/{kernel} {args}\ninitrd {assets_url}/{initrd}\nboot\n",
        args = kernel_args(initrd_name, ignition_url).join(" "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_script_boots_the_assets_with_the_pointer_on_the_command_line() {
        let script = node_script(
            "http://10.0.0.5:8080/assets",
            "flatcar/current/flatcar_production_pxe.vmlinuz",
            "flatcar/current/flatcar_production_pxe_image.cpio.gz",
            "http://10.0.0.5:8080/ignition?mac=52-54-00-aa-bb-01",
        );
        assert_eq!(
            script,
            "#!ipxe\n\
             kernel http://10.0.0.5:8080/assets/flatcar/current/flatcar_production_pxe.vmlinuz \
             initrd=flatcar_production_pxe_image.cpio.gz flatcar.first_boot=1 \
             ignition.config.url=http://10.0.0.5:8080/ignition?mac=52-54-00-aa-bb-01 \
             console=tty0 console=ttyS0,115200n8\n\
             initrd http://10.0.0.5:8080/assets/flatcar/current/flatcar_production_pxe_image.cpio.gz\n\
             boot\n"
        );
    }
}
