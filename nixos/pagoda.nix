# services.pagoda: the server, the model-sync oneshot it requires, and (for cloud images) the
# launch-configuration unit that reads the instance's user data first and the unit that puts the
# model cache on instance-store NVMe (nvme-cache.sh).
#
# Modelled on nixpkgs' ollama and llama-cpp modules (NIX_FACTS.md §7): mkEnableOption, a package
# option, safe defaults (127.0.0.1, firewall closed), typed settings rendered to flags, and the
# systemd hardening list with every exception explained.
# `defaultPackage { pkgs, cuda }` is the package `package` defaults to: the flake's CUDA build
# when `pagoda.gpu.enable` is on, its CPU build otherwise.
{ defaultPackage }:
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.pagoda;
  inherit (lib) mkOption types;

  stateDir = "/var/lib/pagoda";
  downloadDir = "${stateDir}/models";
  launchEnv = "/run/pagoda/launch.env";

  # `settings` become `--flag value` pairs: true gives the bare `--flag`, false `--no-flag` (the
  # way to turn off what is on by default), null leaves the flag out.
  settingsArgs = lib.concatLists (
    lib.mapAttrsToList (
      name: value:
      if value == true then
        [ "--${name}" ]
      else if value == false then
        [ "--no-${name}" ]
      else if value == null then
        [ ]
      else
        [
          "--${name}"
          (toString value)
        ]
    ) cfg.settings
  );

  serveArgs = [
    "serve"
    "--host"
    cfg.host
    "--port"
    (toString cfg.port)
    "--download-dir"
    downloadDir
  ]
  ++ settingsArgs
  ++ cfg.extraFlags;

  # Variables both units read. The model and its name come from `environment` so the launch
  # configuration (an EnvironmentFile, applied after) can replace them.
  environment = {
    PAGODA_LOG_FORMAT = "json";
    PAGODA_DOWNLOAD_DIR = downloadDir;
    HOME = stateDir;
  }
  // lib.optionalAttrs (cfg.model != null) { PAGODA_MODEL = cfg.model; }
  // lib.optionalAttrs (cfg.servedModelName != null) { PAGODA_SERVED_MODEL_NAME = cfg.servedModelName; }
  // lib.optionalAttrs (cfg.apiKeyFile != null) { PAGODA_API_KEY_FILE = toString cfg.apiKeyFile; }
  // cfg.environment;

  environmentFiles = lib.optional cfg.launchConfigFromMetadata "-${launchEnv}" ++ cfg.environmentFiles;

  # Formats and mounts instance-store NVMe at the state directory (`localNvmeCache`).
  nvmeCache = pkgs.writeShellScript "pagoda-nvme-cache" (builtins.readFile ./nvme-cache.sh);

  # Hardening shared by the sync and server units. Exceptions are commented.
  hardening = {
    DynamicUser = true;
    # One dynamic user name for both units, so the sync's files belong to the server too.
    User = "pagoda";
    StateDirectory = "pagoda";
    StateDirectoryMode = "0750";
    WorkingDirectory = stateDir;
    CapabilityBoundingSet = [ "" ];
    # GPU device nodes: PrivateDevices would hide them, so access is instead limited to the NVIDIA
    # character devices with a closed device policy.
    PrivateDevices = false;
    DevicePolicy = "closed";
    # Device groups as /proc/devices names them: major 195 (/dev/nvidia0..N, /dev/nvidiactl) is
    # "nvidia-frontend" or "nvidia" depending on the driver generation, so both are listed; UVM
    # (CUDA's unified memory) and the capability nodes (MIG) have their own.
    DeviceAllow = [
      "char-nvidia-frontend rw"
      "char-nvidia rw"
      "char-nvidia-uvm rw"
      "char-nvidia-caps rw"
    ];
    LockPersonality = true;
    # CUDA's JIT (NVRTC, the driver's PTX compiler) maps writable and executable pages.
    MemoryDenyWriteExecute = false;
    NoNewPrivileges = true;
    PrivateTmp = true;
    PrivateUsers = true;
    # NVML reads /proc/driver/nvidia.
    ProcSubset = "all";
    ProtectClock = true;
    ProtectControlGroups = true;
    ProtectHome = true;
    ProtectHostname = true;
    ProtectKernelLogs = true;
    ProtectKernelModules = true;
    ProtectKernelTunables = true;
    ProtectProc = "invisible";
    ProtectSystem = "strict";
    RemoveIPC = true;
    RestrictAddressFamilies = [
      "AF_INET"
      "AF_INET6"
      "AF_UNIX"
    ];
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service @resources"
      "~@privileged"
    ];
    UMask = "0077";
    EnvironmentFile = environmentFiles;
  };
in
{
  options.services.pagoda = {
    enable = lib.mkEnableOption "Pagoda, an LLM inference server with an OpenAI-compatible API";

    package = mkOption {
      type = types.package;
      default = defaultPackage {
        inherit pkgs;
        cuda = config.pagoda.gpu.enable or false;
      };
      defaultText = lib.literalMD "the flake's `pagoda` package with `pagoda.gpu.enable`, `pagoda-cpu` without";
      description = "The Pagoda package to run.";
    };

    host = mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = "Address the server listens on.";
    };

    port = mkOption {
      type = types.port;
      default = 8000;
      description = "Port the server listens on.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open `port` in the firewall.";
    };

    model = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "s3://models/meta-llama/Llama-3.1-8B-Instruct";
      description = ''
        The model: a local folder, an s3://, gs://, az:// or https:// URI, or a Hugging Face Hub
        model (org/name or hf://org/name@revision, kept in huggingface_hub's cache layout),
        synced into /var/lib/pagoda/models by `pagoda-model-sync.service` before the server starts.
        Null serves the embedded demo model (random weights). The launch configuration can replace
        it.
      '';
    };

    servedModelName = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "llama-3.1-8b";
      description = "Name clients use for the model; null means the `model` value.";
    };

    apiKeyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/secrets/pagoda-api-key";
      description = "File holding the API key(s) clients must send, one per line; null leaves the API open.";
    };

    settings = mkOption {
      type = types.attrsOf (
        types.nullOr (
          types.oneOf [
            types.bool
            types.int
            types.str
          ]
        )
      );
      default = { };
      example = {
        max-model-len = 8192;
        max-num-seqs = 128;
        enable-prefix-caching = true;
      };
      description = ''
        `pagoda serve` flags by name, without the leading dashes (vLLM's names): a value gives
        `--name value`, true the bare `--name`, false `--no-name` (for what is on by default, such as
        `enable-prefix-caching`), null nothing. Flags are rendered in name order.
      '';
    };

    extraFlags = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "--max-queue"
        "512"
      ];
      description = "Further `pagoda serve` arguments, appended after `settings`.";
    };

    environment = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = {
        AWS_REGION = "eu-west-1";
      };
      description = "Environment variables for the sync and server units (cloud regions, endpoints).";
    };

    environmentFiles = mkOption {
      type = types.listOf types.path;
      default = [ ];
      description = "systemd EnvironmentFile= entries for both units (for example store credentials).";
    };

    launchConfigFromMetadata = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Read the model, its name, the API key (a file, or a secret in AWS Secrets Manager, SSM
        Parameter Store, GCP Secret Manager or Azure Key Vault read with the instance's identity)
        and extra flags from the cloud instance's user data at boot (`pagoda metadata`, AWS IMDSv2,
        the GCE metadata server or Azure IMDS), so one image serves any model. What the user data
        sets replaces the options above; a secret that cannot be read keeps the server stopped.
      '';
    };

    localNvmeCache = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Keep the model cache (the state directory, /var/lib/pagoda) on the instance's local NVMe
        disks where the machine has them (AWS instance store, GCE local SSD, Azure's NVMe direct
        disks): `pagoda-nvme-cache.service` formats them at boot if they are shown to be blank
        (blkid and wipefs find nothing, and their first and last MiB can be read; several disks
        become one RAID 0 array, ext4 labelled `pagoda-cache`), mounts them before the sync and the
        server start, and mounts them again after a reboot. It waits up to 30 s for the NVMe
        controllers to come up first. A disk holding anything else, or one it cannot read, is left
        alone with a warning; without such disks, with disks smaller than the root filesystem, or
        with an instance-store controller that does not come up, the cache stays on the root disk.
        The disks are ephemeral: after a stop and start the model is downloaded again. The unit
        runs before the launch configuration is read, so user data cannot turn it off: set this
        option to false in the image's configuration to keep the cache on the root disk.
      '';
    };

    sync = {
      restartSec = mkOption {
        type = types.str;
        default = "10s";
        description = "First wait before a failed model sync is retried; waits grow to `restartMaxDelaySec`.";
      };
      restartMaxDelaySec = mkOption {
        type = types.str;
        default = "5min";
        description = "Longest wait between model-sync retries.";
      };
    };
  };

  config = lib.mkIf cfg.enable {
    networking.firewall.allowedTCPPorts = lib.optional cfg.openFirewall cfg.port;

    systemd.services.pagoda-launch-config = lib.mkIf cfg.launchConfigFromMetadata {
      description = "Pagoda launch configuration from instance user data";
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      before = [
        "pagoda-model-sync.service"
        "pagoda.service"
      ];
      # The metadata service can lag the network at boot: retried, and the units after it wait
      # (a oneshot restarting stays "activating").
      unitConfig.StartLimitIntervalSec = 0;
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        Restart = "on-failure";
        RestartSec = "5s";
        # Reading the metadata service needs no privileges; the files live in /run/pagoda. The
        # server's own dynamic user, so that the API key it writes from `api_key_secret`
        # (/run/pagoda/api-key, mode 0600) is readable by the server and by no one else.
        DynamicUser = true;
        User = "pagoda";
        RuntimeDirectory = "pagoda";
        # Removed when this unit stops (it stays active after its run, RemainAfterExit): the key
        # file never outlives the unit that keeps the dynamic user, and so its UID, allocated.
        # Stopping it stops the sync and the server, which require it.
        RuntimeDirectoryPreserve = false;
        ExecStart = lib.escapeShellArgs [
          (lib.getExe cfg.package)
          "metadata"
          "--output"
          launchEnv
        ];
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
      };
    };

    systemd.services.pagoda-nvme-cache = lib.mkIf cfg.localNvmeCache {
      description = "Pagoda model cache on instance-store NVMe";
      # Mounted before either unit starts, so that systemd sets their StateDirectory up on the
      # mount; wanted, not required: on any problem the script exits 0 and the root disk is used.
      wantedBy = [
        "pagoda-model-sync.service"
        "pagoda.service"
      ];
      before = [
        "pagoda-model-sync.service"
        "pagoda.service"
      ];
      # After udev's coldplug (as sysinit.target already is), so that `udevadm settle` in the
      # script waits for the disks' events; not the deprecated systemd-udev-settle.service: the
      # script waits for the NVMe controllers to come up itself (nvme-cache.sh).
      after = [ "systemd-udev-trigger.service" ];
      # mdadm loads md_mod with modprobe; the kernel loads the raid0 personality itself. dd, df
      # and udevadm come from the path every unit has (coreutils, systemd).
      path = [
        pkgs.util-linux
        pkgs.e2fsprogs
        pkgs.mdadm
        pkgs.kmod
      ];
      # As root and in the host's mount namespace (no DynamicUser, no ProtectSystem or other
      # sandboxing that makes one): formatting needs the disks and the mount must be seen by every
      # later unit.
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = "${nvmeCache}";
        # Waiting for the controllers and udev takes at most a minute and formatting a large
        # array seconds (lazy initialisation); a hung disk must not keep the server from starting
        # on the root disk.
        TimeoutStartSec = "10min";
      };
    };

    systemd.services.pagoda-model-sync = {
      description = "Pagoda model sync";
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ] ++ lib.optional cfg.launchConfigFromMetadata "pagoda-launch-config.service";
      requires = lib.optional cfg.launchConfigFromMetadata "pagoda-launch-config.service";
      inherit environment;
      # Retried with growing waits while the store or the network is not there yet; the server's
      # start waits meanwhile (a oneshot restarting stays "activating").
      unitConfig.StartLimitIntervalSec = 0;
      serviceConfig = hardening // {
        Type = "oneshot";
        RemainAfterExit = true;
        # Syncs $PAGODA_MODEL into the folder `serve --download-dir` reads; a local folder or no
        # model (the demo) leaves nothing to do.
        ExecStart = lib.escapeShellArgs [
          (lib.getExe cfg.package)
          "sync"
          "--progress"
          "log"
        ];
        Restart = "on-failure";
        RestartSec = cfg.sync.restartSec;
        RestartSteps = 8;
        RestartMaxDelaySec = cfg.sync.restartMaxDelaySec;
        # A large model can take long to download.
        TimeoutStartSec = "infinity";
      };
    };

    systemd.services.pagoda = {
      description = "Pagoda LLM inference server";
      wantedBy = [ "multi-user.target" ];
      requires = [ "pagoda-model-sync.service" ];
      after = [
        "network-online.target"
        "pagoda-model-sync.service"
      ]
      ++ lib.optional cfg.launchConfigFromMetadata "pagoda-launch-config.service";
      wants = [ "network-online.target" ];
      inherit environment;
      serviceConfig = hardening // {
        Type = "exec";
        # `$PAGODA_EXTRA_ARGS` (from the launch configuration) is split at spaces by systemd.
        ExecStart = "${lib.escapeShellArgs ([ (lib.getExe cfg.package) ] ++ serveArgs)} $PAGODA_EXTRA_ARGS";
        Restart = "on-failure";
        RestartSec = "5s";
        # SIGTERM drains: in-flight requests finish before the process exits.
        KillSignal = "SIGTERM";
        TimeoutStopSec = "90s";
        # A file descriptor per connection: systemd's default soft limit (1024) is below what
        # `--max-connections` allows by default (the server also raises its soft limit itself).
        LimitNOFILE = 65536;
      };
    };
  };
}
