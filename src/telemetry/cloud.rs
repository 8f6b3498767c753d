//! Which cloud this machine runs in, read from the firmware's DMI strings (no network calls).

use std::path::Path;

/// Where DMI strings live on Linux.
pub const DMI_DIR: &str = "/sys/class/dmi/id";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudInfo {
    /// `aws`, `gcp`, `azure`, `oci` or `none`.
    pub provider: &'static str,
    /// The instance type where DMI carries it (AWS Nitro), else `unknown`.
    pub instance_type: String,
}

/// Reads `sys_vendor`, `product_name`, `bios_vendor` and `chassis_asset_tag` from `dmi_dir`.
/// Missing files (containers without /sys, other OSes) mean no cloud.
pub fn detect(dmi_dir: &Path) -> CloudInfo {
    let read =
        |name: &str| std::fs::read_to_string(dmi_dir.join(name)).map(|s| s.trim().to_string()).unwrap_or_default();
    classify(&read("sys_vendor"), &read("product_name"), &read("bios_vendor"), &read("chassis_asset_tag"))
}

pub fn classify(sys_vendor: &str, product_name: &str, bios_vendor: &str, chassis_asset_tag: &str) -> CloudInfo {
    let unknown = || "unknown".to_string();
    let (provider, instance_type) = if sys_vendor == "Amazon EC2" || bios_vendor == "Amazon EC2" {
        // On Nitro instances the product name is the instance type ("g5.xlarge").
        let known = !product_name.is_empty() && product_name.contains('.');
        ("aws", if known { product_name.to_string() } else { unknown() })
    } else if sys_vendor == "Google" || product_name == "Google Compute Engine" || bios_vendor == "Google" {
        ("gcp", unknown())
    } else if sys_vendor == "Microsoft Corporation" && product_name == "Virtual Machine" {
        ("azure", unknown())
    } else if chassis_asset_tag.contains("OracleCloud.com") || sys_vendor.starts_with("Oracle") {
        ("oci", unknown())
    } else {
        ("none", "none".to_string())
    };
    CloudInfo { provider, instance_type }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_each_cloud_from_its_dmi_strings() {
        assert_eq!(
            classify("Amazon EC2", "g5.xlarge", "Amazon EC2", ""),
            CloudInfo { provider: "aws", instance_type: "g5.xlarge".into() }
        );
        assert_eq!(classify("Google", "Google Compute Engine", "Google", "").provider, "gcp");
        assert_eq!(
            classify(
                "Microsoft Corporation",
                "Virtual Machine",
                "American Megatrends Inc.",
                "7783-7084-3265-9085-8269-3286-77"
            )
            .provider,
            "azure"
        );
        assert_eq!(classify("QEMU", "Standard PC (i440FX + PIIX, 1996)", "SeaBIOS", "OracleCloud.com").provider, "oci");
        assert_eq!(
            classify("Dell Inc.", "PowerEdge R750", "Dell Inc.", ""),
            CloudInfo { provider: "none", instance_type: "none".into() }
        );
    }

    #[test]
    fn reads_a_dmi_folder_and_tolerates_its_absence() {
        let dir = std::env::temp_dir().join(format!("pagoda-dmi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("sys_vendor"), "Amazon EC2\n").unwrap();
        std::fs::write(dir.join("product_name"), "p5.48xlarge\n").unwrap();
        assert_eq!(detect(&dir), CloudInfo { provider: "aws", instance_type: "p5.48xlarge".into() });
        assert_eq!(detect(&dir.join("missing")).provider, "none");
    }
}
