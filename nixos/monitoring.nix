# pagoda.monitoring: the node exporter, the NVIDIA GPU exporter (when the GPU is on) and Pagoda's
# own /metrics, plus an optional local Prometheus that scrapes all three and an optional Grafana
# with the Pagoda dashboard provisioned.
#
# Option names: NIX_FACTS.md §6 (exporters framework, node `enabledCollectors`, `nvidia-gpu` on
# port 9835, prometheus `scrapeConfigs`); Grafana's `provision.{enable,datasources,dashboards}.settings`
# and `settings.security.secret_key` (nullOr str, default null) read in nixpkgs'
# nixos/modules/services/monitoring/grafana.nix.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.pagoda.monitoring;
  pagoda = config.services.pagoda;
  exporters = config.services.prometheus.exporters;
  gpu = config.pagoda.gpu.enable or false;

  # The server listens on `host`; a wildcard address is scraped over loopback.
  pagodaTarget =
    let
      host = if lib.elem pagoda.host [ "0.0.0.0" "::" ] then "127.0.0.1" else pagoda.host;
      bracketed = if lib.hasInfix ":" host then "[${host}]" else host;
    in
    "${bracketed}:${toString pagoda.port}";

  job = name: port: {
    job_name = name;
    static_configs = [ { targets = [ "127.0.0.1:${toString port}" ]; } ];
  };

  # The dashboard file is the one the Helm chart ships; Grafana watches a folder, so it gets one.
  dashboards = pkgs.runCommand "pagoda-grafana-dashboards" { } ''
    mkdir -p $out
    cp ${../helm/pagoda/files/grafana/pagoda.json} $out/pagoda.json
  '';
in
{
  options.pagoda.monitoring = {
    enable = lib.mkEnableOption "the node and NVIDIA GPU exporters next to Pagoda's own /metrics";

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the exporters' ports, for a Prometheus elsewhere.";
    };

    prometheus.enable = lib.mkEnableOption "a local Prometheus scraping the node exporter, the GPU exporter and Pagoda";

    grafana = {
      enable = lib.mkEnableOption "a local Grafana (on 127.0.0.1:3000) with the Pagoda dashboard";
      secretKeyFile = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        example = "/run/secrets/grafana-secret-key";
        description = ''
          File holding Grafana's secret key (for example `openssl rand -hex 32`), read at start so
          the key stays out of the Nix store. Required with `grafana.enable`.
        '';
      };
    };
  };

  config = lib.mkIf cfg.enable (
    lib.mkMerge [
      {
        services.prometheus.exporters.node = {
          enable = true;
          enabledCollectors = [ "systemd" ];
          inherit (cfg) openFirewall;
        };
        services.prometheus.exporters.nvidia-gpu = lib.mkIf gpu {
          enable = true;
          inherit (cfg) openFirewall;
        };
      }

      (lib.mkIf cfg.prometheus.enable {
        services.prometheus = {
          enable = true;
          listenAddress = "127.0.0.1";
          scrapeConfigs = [
            (job "node" exporters.node.port)
            {
              job_name = "pagoda";
              static_configs = [ { targets = [ pagodaTarget ]; } ];
            }
          ]
          ++ lib.optional gpu (job "nvidia-gpu" exporters.nvidia-gpu.port);
        };
      })

      (lib.mkIf cfg.grafana.enable {
        assertions = [
          {
            assertion = cfg.grafana.secretKeyFile != null;
            message = "pagoda.monitoring.grafana.secretKeyFile must name a file holding Grafana's secret key.";
          }
          {
            assertion = cfg.prometheus.enable;
            message = "pagoda.monitoring.grafana.enable needs pagoda.monitoring.prometheus.enable, its data source.";
          }
        ];
        services.grafana = {
          enable = true;
          settings.security.secret_key = "$__file{${toString cfg.grafana.secretKeyFile}}";
          provision = {
            enable = true;
            datasources.settings = {
              apiVersion = 1;
              datasources = [
                {
                  name = "Prometheus";
                  type = "prometheus";
                  url = "http://127.0.0.1:${toString config.services.prometheus.port}";
                  access = "proxy";
                  isDefault = true;
                }
              ];
            };
            dashboards.settings = {
              apiVersion = 1;
              providers = [
                {
                  name = "pagoda";
                  options.path = dashboards;
                }
              ];
            };
          };
        };
      })
    ]
  );
}
