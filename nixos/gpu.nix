# pagoda.gpu: the NVIDIA datacenter driver, its persistence daemon and the container toolkit,
# behind one option so the same configuration also boots on a machine (or a test VM) without a GPU.
#
# Option names and traps: NIX_FACTS.md §2 (there is no `hardware.nvidia.enable`; `open` must be
# set on drivers >= 560; `datacenter.enable` and `videoDrivers = [ "nvidia" ]` exclude each other;
# in datacenter mode /run/opengl-driver needs `hardware.graphics.enable`; the container toolkit
# asserts that one of the two driver modes is on). `nvidiaPackages.dc` is dc_580 on the pinned
# nixos-unstable, which ships open kernel modules (§2.1, §10).
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.pagoda.gpu;
  # The fabric manager's start condition: an NVSwitch on the PCI bus.
  hasNvswitch = pkgs.writeShellScript "pagoda-has-nvswitch" (builtins.readFile ./has-nvswitch.sh);
in
{
  options.pagoda.gpu = {
    enable = lib.mkEnableOption "NVIDIA GPUs: the datacenter driver, nvidia-persistenced and the container toolkit";

    openKernelModule = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Use NVIDIA's open kernel modules (`hardware.nvidia.open`). Hopper (H100, H200) works with
        both; Blackwell (B200, GB200) needs the open ones; pre-Turing GPUs need the closed ones.
      '';
    };

    fabricManager = lib.mkOption {
      type = lib.types.either lib.types.bool (lib.types.enum [ "auto" ]);
      default = "auto";
      description = ''
        nvidia-fabricmanager, which HGX/DGX machines whose GPUs talk through NVSwitch need (AWS
        p4d/p5, GCP a2-ultragpu/a3-highgpu-8g, Azure ND H100 v5). `"auto"`: the driver runs in
        datacenter mode and the fabric manager starts at boot only where an NVSwitch is on the PCI
        bus, so one image serves single-GPU and NVSwitch shapes. `true`: always (datacenter mode).
        `false`: never, the driver selected through `services.xserver.videoDrivers` instead.
      '';
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        hardware.nvidia = {
          # The data-center branch, matched to nixpkgs' default cudaPackages.
          package = config.boot.kernelPackages.nvidiaPackages.dc;
          open = cfg.openKernelModule;
          # Keeps the driver initialised between CUDA processes (headless servers have no X
          # server to do it), so the server's start does not pay for GPU initialisation.
          nvidiaPersistenced = true;
          nvidiaSettings = false;
        };
        # /run/opengl-driver/lib, where the `pagoda` wrapper finds libcuda.so.1.
        hardware.graphics.enable = true;
        # CDI for `docker run --device nvidia.com/gpu=all` and podman.
        hardware.nvidia-container-toolkit.enable = true;
        # The service cannot load modules itself (ProtectKernelModules, no privileges); load UVM,
        # which CUDA needs, at boot. The open modules load it anyway.
        boot.kernelModules = [ "nvidia_uvm" ];
      }
      (lib.mkIf (cfg.fabricManager != false) {
        # Datacenter mode is the one that has the fabric manager; the driver is the same dc one.
        hardware.nvidia.datacenter.enable = true;
      })
      (lib.mkIf (cfg.fabricManager == "auto") {
        # Skipped, not failed, where no NVSwitch is found (a condition, not a start failure).
        systemd.services.nvidia-fabricmanager.serviceConfig.ExecCondition = "${hasNvswitch}";
      })
      (lib.mkIf (cfg.fabricManager == false) {
        # Selects the driver without starting X (services.xserver.enable stays false).
        services.xserver.videoDrivers = [ "nvidia" ];
      })
    ]
  );
}
