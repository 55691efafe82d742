# nixboot client: the NixOS module a network-booted lab machine's configuration imports.
#
# Stage 1 (initrd): DHCP in the initrd, then stage1.sh checks the disk against the declared
# layout and partitions it only when it differs (preLVMCommands), NixOS's stage 1 mounts it at
# /mnt-root, and stage1.sh fetches the generation's closure from the nixboot cache with the Nix
# that this module puts into the initrd (postMountCommands). NixOS's stage 1 then switch_roots
# into the generation's init (the `init=` the nixboot menu wrote), and a unit of stage 2 reports
# `booted`. Every parameter comes from the kernel command line the nixboot menu renders.
{ config, lib, pkgs, ... }:

let
  cfg = config.nixboot.client;
  stage1 = pkgs.writeScript "nixboot-stage1" (builtins.readFile ./stage1.sh);
  # exported for stage1.sh: the declared layout (the kernel command line may override each)
  layoutEnv = ''
    export NIXBOOT_DISK=${lib.escapeShellArg cfg.disk}
    export NIXBOOT_TABLE=${lib.escapeShellArg cfg.partitionTable}
    export NIXBOOT_LABEL=${lib.escapeShellArg cfg.label}
    export NIXBOOT_FS=${lib.escapeShellArg cfg.fsType}
    export NIXBOOT_ONFAIL=${lib.escapeShellArg cfg.onFailure}
  '';
in
{
  options.nixboot.client = {
    enable = lib.mkEnableOption "booting this machine from a nixboot server";

    disk = lib.mkOption {
      type = lib.types.str;
      default = "auto";
      example = "/dev/nvme0n1";
      description = ''
        Disk holding the Nix store between boots. "auto": the first of /dev/vda, /dev/sda,
        /dev/nvme0n1, /dev/xvda. It is repartitioned only when its layout differs from the
        declared one (one partition named `label`, formatted `fsType`).
      '';
    };

    partitionTable = lib.mkOption {
      type = lib.types.enum [ "gpt" "dos" ];
      default = "gpt";
      description = "Partition table type of the declared layout.";
    };

    label = lib.mkOption {
      type = lib.types.str;
      default = "nixboot";
      description = "GPT partition name and filesystem label of the store partition.";
    };

    fsType = lib.mkOption {
      type = lib.types.enum [ "ext4" ];
      default = "ext4";
      description = "Filesystem of the store partition.";
    };

    onFailure = lib.mkOption {
      type = lib.types.enum [ "reboot" "poweroff" "shell" ];
      default = "reboot";
      description = "What stage 1 does after reporting a failure (reboot: try the network boot again).";
    };

    substituteJobs = lib.mkOption {
      type = lib.types.ints.positive;
      default = 8;
      description = "Parallel downloads while fetching the closure (nix-store -j).";
    };
  };

  config = lib.mkIf cfg.enable {
    # The machine boots from the network every time: the OS must never put itself ahead of
    # network boot in the firmware's boot order.
    boot.loader.efi.canTouchEfiVariables = false;
    boot.loader.grub.enable = false;
    boot.loader.systemd-boot.enable = false;

    boot.kernelParams = [ "nixboot.jobs=${toString cfg.substituteJobs}" ];

    fileSystems."/" = {
      device = "/dev/disk/by-label/${cfg.label}";
      fsType = cfg.fsType;
    };

    boot.initrd = {
      availableKernelModules = [ "virtio_net" "virtio_pci" "virtio_blk" "e1000e" "igb" "r8169" "ext4" ];
      network.enable = true;
      # initrd-network.nix runs udhcpc on every interface when this is set
      network.udhcpc.enable = true;

      extraUtilsCommands = ''
        copy_bin_and_libs ${pkgs.util-linux}/bin/sfdisk
        copy_bin_and_libs ${pkgs.util-linux}/bin/blkid
        copy_bin_and_libs ${pkgs.e2fsprogs}/bin/mke2fs
        ln -sf mke2fs $out/bin/mkfs.ext4
        copy_bin_and_libs ${pkgs.curl}/bin/curl
        cp ${stage1} $out/bin/nixboot-stage1
      '';
      extraUtilsCommandsTest = ''
        $out/bin/sfdisk --version
        $out/bin/blkid --version
      '';

      # Nix itself is too large for extra-utils' library rewriting; it comes in with its closure.
      systemd.storePaths = lib.mkIf config.boot.initrd.systemd.enable [ pkgs.nix ];

      preLVMCommands = ''
        ${layoutEnv}
        nixboot-stage1 disk
      '';

      postMountCommands = ''
        ${layoutEnv}
        export PATH=${pkgs.nix}/bin:$PATH
        mkdir -p /etc
        [ -e /etc/passwd ] || echo 'root:x:0:0:root:/root:/bin/sh' > /etc/passwd
        [ -e /etc/group ] || echo 'root:x:0:' > /etc/group
        nixboot-stage1 closure
        nixboot-stage1 report stage2 started "switching to $(sed -n 's/.*init=\([^ ]*\).*/\1/p' /proc/cmdline)"
      '';
    };

    # Nix in the scripted initrd: its whole closure goes into the initrd image.
    boot.initrd.extraFiles."/nix-for-nixboot".source = pkgs.nix;

    systemd.services.nixboot-report-booted = {
      description = "Tell the nixboot server that this generation booted";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      path = [ pkgs.curl pkgs.coreutils pkgs.gnused pkgs.gawk ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = "${pkgs.runtimeShell} ${stage1} report booted done \"%H\"";
      };
    };
  };
}
