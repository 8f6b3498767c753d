# Evaluates Pagoda's NixOS modules with nixpkgs' `lib.evalModules` alone (no nixpkgs checkout, no
# builds): the NixOS options the modules set are declared here as stubs, and each scenario returns
# the parts of the configuration tests/nix/test_modules.py asserts on.
#
#   nix-instantiate --eval --strict --json tests/nix/eval.nix --arg lib 'import LIB' -A SCENARIO
{ lib }:

let
  inherit (lib) mkOption types;

  freeform = mkOption {
    type = types.submodule { freeformType = types.attrsOf types.anything; };
    default = { };
  };

  # An exporter: its port (the one nixpkgs defaults to) and anything else.
  exporter =
    port:
    mkOption {
      type = types.submodule {
        freeformType = types.attrsOf types.anything;
        options.port = mkOption {
          type = types.port;
          default = port;
        };
      };
      default = { };
    };

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
  };

  # The NixOS options Pagoda's modules set or read, with the defaults nixpkgs gives them.
  nixosStubs = {
    options = {
      assertions = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
      };
      systemd.services = mkOption {
        type = types.attrsOf (types.submodule { freeformType = types.attrsOf types.anything; });
        default = { };
      };
      networking.firewall.allowedTCPPorts = mkOption {
        type = types.listOf types.port;
        default = [ ];
      };
      boot.kernelModules = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      boot.kernelPackages = mkOption {
        type = types.unspecified;
        default.nvidiaPackages.dc = fakePackage "nvidia-dc";
      };
      services.xserver.videoDrivers = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      services.prometheus = {
        enable = mkOption {
          type = types.bool;
          default = false;
        };
        port = mkOption {
          type = types.port;
          default = 9090;
        };
        listenAddress = mkOption {
          type = types.str;
          default = "0.0.0.0";
        };
        scrapeConfigs = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
        exporters = {
          node = exporter 9100;
          nvidia-gpu = exporter 9835;
        };
      };
      services.grafana = freeform;
      services.openssh = freeform;
      hardware = {
        nvidia = freeform;
        graphics = freeform;
        nvidia-container-toolkit = freeform;
      };
      image.modules = mkOption {
        type = types.attrsOf types.unspecified;
        default = { };
      };
      system.stateVersion = mkOption { type = types.str; };
    };
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
      inherit (unit) description;
      ExecStart = unit.serviceConfig.ExecStart;
      Type = unit.serviceConfig.Type;
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
