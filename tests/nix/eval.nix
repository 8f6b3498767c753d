# Evaluates Pagoda's NixOS modules with nixpkgs' `lib.evalModules` alone (no nixpkgs checkout, no
# builds): the NixOS options the modules set are declared here as stubs, and each scenario returns
# the parts of the configuration tests/nix/test_modules.py asserts on.
#
#   nix-instantiate --eval --strict --json tests/nix/eval.nix --arg lib 'import LIB' -A SCENARIO
{ lib }:

let
  inherit (lib) mkOption types;

  # The stubs below declare each nixpkgs option Pagoda's modules set or read, with the type, the
  # allowed values and the default nixpkgs gives it (the file each comes from, under nixos/modules/,
  # is named beside it). Nothing is freeform that is not freeform in nixpkgs, so a misspelled name
  # or a value nixpkgs would refuse fails evaluation here too (tests/nix/test_modules.py's mutation
  # test proves it).
  bool = default: mkOption {
    type = types.bool;
    inherit default;
  };
  port = default: mkOption {
    type = types.port;
    inherit default;
  };
  # A submodule of options, taking no other keys.
  strict =
    options:
    mkOption {
      type = types.submodule { inherit options; };
      default = { };
    };
  # A submodule that takes any key beside its declared options (nixpkgs' freeform settings).
  freeformWith =
    options:
    mkOption {
      type = types.submodule {
        freeformType = types.attrsOf types.anything;
        inherit options;
      };
      default = { };
    };

  # services/monitoring/grafana.nix: a provisioning file's settings, its apiVersion and a list
  # (named `list`) of freeform YAML entries, or null for none.
  provisioning =
    list:
    mkOption {
      type = types.nullOr (
        types.submodule {
          options.apiVersion = mkOption {
            type = types.int;
            default = 1;
          };
          options.${list} = mkOption {
            type = types.listOf (types.submodule { freeformType = types.attrsOf types.anything; });
            default = [ ];
          };
        }
      );
      default = null;
    };

  # services/monitoring/prometheus/exporters.nix: every exporter's common options; `extra` are an
  # exporter's own.
  exporter =
    defaultPort: extra:
    strict (
      {
        enable = bool false;
        port = port defaultPort;
        listenAddress = mkOption {
          type = types.str;
          default = "0.0.0.0";
        };
        extraFlags = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        openFirewall = bool false;
        user = mkOption {
          type = types.str;
          default = "nobody";
        };
        group = mkOption {
          type = types.str;
          default = "nogroup";
        };
      }
      // extra
    );

  # A derivation as far as the module system and lib.getExe care.
  fakePackage = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    version = "0.0.0";
    meta.mainProgram = "pagoda";
  };

  fakePkgs = {
    runCommand = name: _env: _script: fakePackage name;
    writeShellScript = name: _text: fakePackage name;
    # The tools pagoda-nvme-cache runs.
    util-linux = fakePackage "util-linux";
    e2fsprogs = fakePackage "e2fsprogs";
    mdadm = fakePackage "mdadm";
    kmod = fakePackage "kmod";
  };

  # The NixOS options Pagoda's modules set or read, as nixpkgs declares them in every system.
  nixosStubs = {
    options = {
      # misc/assertions.nix
      assertions = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
      };
      # system/boot/systemd.nix: units are submodules with many options; Pagoda's unit files are
      # what tests/nix asserts on, so they stay open here.
      systemd.services = mkOption {
        type = types.attrsOf (types.submodule { freeformType = types.attrsOf types.anything; });
        default = { };
      };
      # services/networking/firewall.nix
      networking.firewall.allowedTCPPorts = mkOption {
        type = types.listOf types.port;
        default = [ ];
      };
      # system/boot/kernel.nix (nixpkgs also takes an attribute set of booleans; Pagoda gives a list)
      boot.kernelModules = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      boot.kernelPackages = mkOption {
        type = types.unspecified;
        default.nvidiaPackages.dc = fakePackage "nvidia-dc";
      };
      # services/x11/xserver.nix
      services.xserver.videoDrivers = mkOption {
        type = types.listOf types.str;
        default = [
          "modesetting"
          "fbdev"
        ];
      };
      # services/monitoring/prometheus/default.nix
      services.prometheus = {
        enable = bool false;
        port = port 9090;
        listenAddress = mkOption {
          type = types.str;
          default = "0.0.0.0";
        };
        scrapeConfigs = mkOption {
          # promTypes.scrape_config: a submodule of declared fields only (those Pagoda sets here).
          type = types.listOf (
            types.submodule {
              options.job_name = mkOption { type = types.str; };
              options.static_configs = mkOption {
                type = types.nullOr (
                  types.listOf (
                    types.submodule {
                      options.targets = mkOption { type = types.listOf types.str; };
                      options.labels = mkOption {
                        type = types.attrsOf types.str;
                        default = { };
                      };
                    }
                  )
                );
                default = null;
              };
            }
          );
          default = [ ];
        };
        # services/monitoring/prometheus/exporters.nix and exporters/{node,nvidia-gpu}.nix
        exporters = {
          node = exporter 9100 {
            enabledCollectors = mkOption {
              type = types.listOf types.str;
              default = [ ];
            };
            disabledCollectors = mkOption {
              type = types.listOf types.str;
              default = [ ];
            };
          };
          nvidia-gpu = exporter 9835 { };
        };
      };
      # services/monitoring/grafana.nix: `settings` is freeform INI with declared sections.
      services.grafana = {
        enable = bool false;
        settings = freeformWith {
          security = freeformWith {
            secret_key = mkOption {
              type = types.nullOr types.str;
              default = null;
            };
          };
        };
        provision = {
          enable = bool false;
          datasources.settings = provisioning "datasources";
          dashboards.settings = provisioning "providers";
        };
      };
      # services/networking/ssh/sshd.nix: `settings` is freeform with declared keys.
      services.openssh.settings = freeformWith {
        PasswordAuthentication = mkOption {
          type = types.nullOr types.bool;
          default = true;
        };
        KbdInteractiveAuthentication = mkOption {
          type = types.nullOr types.bool;
          default = true;
        };
      };
      # hardware/video/nvidia.nix: plain options, not a submodule.
      hardware.nvidia = {
        # Declared without a type; nixpkgs defaults to the stable (or, in datacenter mode, the dc)
        # driver of the kernel's package set.
        package = mkOption { default = fakePackage "nvidia-stable"; };
        open = mkOption {
          type = types.nullOr types.bool;
          default = null;
        };
        nvidiaPersistenced = bool false;
        nvidiaSettings = bool true;
        datacenter.enable = bool false;
        # Computed by the module: setting it is an error.
        enabled = mkOption {
          type = types.bool;
          readOnly = true;
          default = false;
        };
      };
      # hardware/graphics.nix
      hardware.graphics.enable = bool false;
      # services/hardware/nvidia-container-toolkit/default.nix
      hardware.nvidia-container-toolkit.enable = bool false;
      # virtualisation/amazon-options.nix (in every system; declared without a type)
      ec2.efi = mkOption {
        type = types.bool;
        default = false;
      };
      # image/images.nix
      image.modules = mkOption {
        type = types.attrsOf types.deferredModule;
        default = { };
      };
      system.stateVersion = mkOption { type = types.str; };
    };
  };

  # virtualisation/disk-size-option.nix, imported by the image builders.
  diskSize = mkOption {
    type = types.either (types.enum [ "auto" ]) types.ints.positive;
    default = "auto";
  };

  # The options each image variant's builder module (images.nix) adds to the system.
  variantStubs = {
    # maintainers/scripts/ec2/amazon-image.nix imports virtualisation/amazon-init.nix.
    amazon.options.virtualisation = {
      inherit diskSize;
      amazon-init.enable = bool true;
    };
    # virtualisation/azure-image.nix
    azure.options.virtualisation = {
      inherit diskSize;
      azureImage.vmGeneration = mkOption {
        type = types.enum [
          "v1"
          "v2"
        ];
        default = "v1";
      };
    };
    # virtualisation/google-compute-image.nix
    google-compute.options.virtualisation = {
      inherit diskSize;
      googleComputeImage.efi = bool false;
    };
    # virtualisation/disk-image.nix
    qemu-efi.options.virtualisation = { inherit diskSize; };
  };

  pagodaModules = import ../../nixos {
    defaultPackage = { cuda, ... }: fakePackage (if cuda then "pagoda" else "pagoda-cpu");
  };

  eval =
    modules:
    (lib.evalModules {
      modules = [
        nixosStubs
        pagodaModules
        { _module.args.pkgs = fakePkgs; }
      ]
      ++ modules;
    }).config;

  units = config: config.systemd.services;

  # What the tests look at for a configuration.
  summary = config: {
    units = lib.mapAttrs (_: unit: {
      # Units of nixpkgs' own that Pagoda only amends (nvidia-fabricmanager) have no description here.
      description = unit.description or null;
      ExecStart = unit.serviceConfig.ExecStart or null;
      ExecCondition = unit.serviceConfig.ExecCondition or null;
      Type = unit.serviceConfig.Type or null;
      User = unit.serviceConfig.User or null;
      DynamicUser = unit.serviceConfig.DynamicUser or false;
      RuntimeDirectoryPreserve = unit.serviceConfig.RuntimeDirectoryPreserve or null;
      # Package names (a `path` entry may also be a string).
      path = map (p: p.name or p) (unit.path or [ ]);
      EnvironmentFile = unit.serviceConfig.EnvironmentFile or [ ];
      Restart = unit.serviceConfig.Restart or null;
      DeviceAllow = unit.serviceConfig.DeviceAllow or [ ];
      LimitNOFILE = unit.serviceConfig.LimitNOFILE or null;
      environment = unit.environment or { };
      after = unit.after or [ ];
      before = unit.before or [ ];
      requires = unit.requires or [ ];
      wantedBy = unit.wantedBy or [ ];
    }) (units config);
    firewall = config.networking.firewall.allowedTCPPorts;
    failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
    exporters = lib.mapAttrs (_: e: e.enable or false) config.services.prometheus.exporters;
    scrapeJobs = lib.listToAttrs (
      map (job: lib.nameValuePair job.job_name (lib.concatMap (s: s.targets) job.static_configs)) config.services.prometheus.scrapeConfigs
    );
    prometheus = config.services.prometheus.enable;
    grafana = config.services.grafana.enable or false;
    # Forces the provisioning settings through their types.
    grafanaProvisioning =
      let
        inherit (config.services.grafana.provision) datasources dashboards;
        names = settings: list: if settings == null then [ ] else map (entry: entry.name) settings.${list};
      in
      {
        datasources = names datasources.settings "datasources";
        dashboards = names dashboards.settings "providers";
      };
    nvidia =
      let
        nvidia = config.hardware.nvidia;
      in
      {
        open = nvidia.open or null;
        persistenced = nvidia.nvidiaPersistenced or false;
        settings = nvidia.nvidiaSettings or null;
        package = nvidia.package.name or null;
        datacenter = nvidia.datacenter.enable or false;
      };
    videoDrivers = config.services.xserver.videoDrivers;
    graphics = config.hardware.graphics.enable or false;
    containerToolkit = config.hardware.nvidia-container-toolkit.enable or false;
    kernelModules = config.boot.kernelModules;
  };
in
{
  # The smallest configuration: defaults only.
  defaults = summary (eval [ { services.pagoda.enable = true; } ]);

  disabled = summary (eval [ { services.pagoda.model = "s3://models/x"; } ]);

  # A configured server with an object-store model.
  configured = summary (eval [
    {
      services.pagoda = {
        enable = true;
        host = "0.0.0.0";
        port = 8080;
        openFirewall = true;
        model = "s3://models/meta-llama/Llama-3.1-8B-Instruct";
        servedModelName = "llama-3.1-8b";
        apiKeyFile = "/run/secrets/pagoda-api-key";
        settings = {
          max-model-len = 8192;
          enable-prefix-caching = true;
          enable-chunked-prefill = false;
          max-num-seqs = null;
        };
        extraFlags = [
          "--max-queue"
          "512"
        ];
        environment.AWS_REGION = "eu-west-1";
        environmentFiles = [ "/run/secrets/store-credentials" ];
      };
    }
  ]);

  nvmeCache = summary (eval [
    {
      services.pagoda = {
        enable = true;
        localNvmeCache = true;
      };
    }
  ]);

  launchConfig = summary (eval [
    {
      services.pagoda = {
        enable = true;
        launchConfigFromMetadata = true;
      };
    }
  ]);

  monitoring = summary (eval [
    {
      services.pagoda = {
        enable = true;
        host = "::";
      };
      pagoda.monitoring = {
        enable = true;
        prometheus.enable = true;
        grafana = {
          enable = true;
          secretKeyFile = "/run/secrets/grafana";
        };
      };
    }
  ]);

  grafanaWithoutKey = summary (eval [
    {
      services.pagoda.enable = true;
      pagoda.monitoring = {
        enable = true;
        grafana.enable = true;
      };
    }
  ]);

  gpu = summary (eval [
    {
      services.pagoda.enable = true;
      pagoda.gpu.enable = true;
      pagoda.monitoring = {
        enable = true;
        prometheus.enable = true;
      };
    }
  ]);

  gpuFabric = summary (eval [
    {
      services.pagoda.enable = true;
      pagoda.gpu = {
        enable = true;
        fabricManager = true;
        openKernelModule = false;
      };
    }
  ]);

  gpuNoFabric = summary (eval [
    {
      services.pagoda.enable = true;
      pagoda.gpu = {
        enable = true;
        fabricManager = false;
      };
    }
  ]);

  # The cloud appliance's base configuration and the modules its image variants get.
  appliance =
    let
      config = eval [ ../../images/appliance.nix ];
    in
    summary config
    // {
      imageVariants = lib.attrNames config.image.modules;
      gpuEnabled = config.pagoda.gpu.enable;
      qemuGpu = (eval [
        ../../images/appliance.nix
        config.image.modules.qemu-efi
      ]).pagoda.gpu.enable;
    };

  # Each image variant: the appliance with the variant's own module and its builder's options,
  # as images.nix builds it.
  variants = lib.mapAttrs (
    name: stubs:
    let
      config = eval [
        ../../images/appliance.nix
        stubs
        (eval [ ../../images/appliance.nix ]).image.modules.${name}
      ];
    in
    summary config
    // {
      inherit (config.virtualisation) diskSize;
      gpuEnabled = config.pagoda.gpu.enable;
      ec2Efi = config.ec2.efi;
      amazonInit = config.virtualisation.amazon-init.enable or null;
      vmGeneration = config.virtualisation.azureImage.vmGeneration or null;
      googleEfi = config.virtualisation.googleComputeImage.efi or null;
    }
  ) variantStubs;

  # The limits: the highest port is taken, one more fails evaluation with the option's name.
  maxPort = summary (eval [
    {
      services.pagoda = {
        enable = true;
        port = 65535;
        openFirewall = true;
      };
    }
  ]);
  badPort = (eval [ { services.pagoda.port = 65536; } ]).services.pagoda.port;
  badSetting = (eval [ { services.pagoda.settings.max-model-len = [ 1 ]; } ]).services.pagoda.settings;
}
