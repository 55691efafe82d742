# A NixOS-shaped system closure from raw derivations (Debian's nix has no nixpkgs here).
#
# config.system.build.toplevel is laid out like NixOS's: kernel, initrd, init, kernel-params, etc,
# sw, nixos-version, with real store references kernel <- initrd, packages <- sw/etc <- toplevel.
# Every byte is deterministic (pseudo-random payloads come from busybox awk's seeded rand()), so
# two builds give identical NAR hashes.
#
# A real kernel/initrd is used when the flake directory holds boot/bzImage and boot/initrd (the
# end-to-end tests copy them in); otherwise small dummy files stand in.
{ hostName, knobs, system ? "x86_64-linux" }:
let
  # The static busybox placed in ./bb/bin by prepare.sh; `sh` is a symlink to it because a bare
  # busybox as builder sees its store name as argv[0].
  bb = builtins.path { path = ./bb; name = "busybox-static"; };
  mk = name: script: derivation {
    inherit name system;
    builder = "${bb}/bin/sh";
    args = [ "-e" "-c" script ];
    PATH = "${bb}/bin";
  };
  # Deterministic pseudo-random bytes: the same seed gives the same bytes on every build.
  payload = seed: kib: out: ''
    awk 'BEGIN { srand(${toString seed}); for (i = 0; i < ${toString kib} * 1024; i++) printf "%c", int(rand() * 256) }' > ${out}
  '';
  pkg = { name, version, seed, deps ? [ ], delay ? 0 }: mk "${name}-${version}" ''
    ${if delay > 0 then "sleep ${toString delay}" else ""}
    mkdir -p $out/bin $out/share/${name} $out/nix-support
    ${payload seed knobs.payloadKiB "$out/share/${name}/data.bin"}
    printf '#!${bb}/bin/sh\necho "${name} ${version}"\n' > $out/bin/${name}
    chmod +x $out/bin/${name}
    for d in ${builtins.concatStringsSep " " (map toString deps)}; do echo "$d" >> $out/nix-support/propagated; done
    touch $out/nix-support/propagated
  '';

  libc = pkg { name = "demo-libc"; version = "2.38"; seed = 11; };
  coreutils = pkg { name = "demo-coreutils"; version = "9.4"; seed = 12; deps = [ libc ]; };
  tools = pkg { name = "demo-tools"; version = "1.2"; seed = 13; deps = [ libc ]; };
  app = pkg { name = "demo-app"; version = knobs.appVersion; seed = 14; deps = [ libc coreutils ];
    delay = knobs.buildDelaySeconds; };
  packages = [ libc coreutils tools app ];

  realBoot = builtins.pathExists ./boot/bzImage && builtins.pathExists ./boot/initrd;
  kernelVersion = "6.1.0-demo";
  kernel = mk "linux-${kernelVersion}" (''
    mkdir -p $out/lib/modules/${kernelVersion}
    echo "kernel/drivers/net/virtio_net.ko:" > $out/lib/modules/${kernelVersion}/modules.dep
  '' + (if realBoot then ''
    cp ${./boot/bzImage} $out/bzImage
  '' else payload 21 knobs.payloadKiB "$out/bzImage"));
  initrd = mk "initrd-${kernelVersion}" (''
    mkdir -p $out
    echo "${kernel}/lib/modules/${kernelVersion}" > $out/modules-path
  '' + (if realBoot then ''
    cp ${./boot/initrd} $out/initrd
  '' else payload 22 knobs.payloadKiB "$out/initrd"));

  sw = mk "system-path" ''
    mkdir -p $out/bin
    for p in ${builtins.concatStringsSep " " (map toString packages)}; do
      for f in $p/bin/*; do ln -s $f $out/bin/; done
    done
  '';
  etc = mk "etc" ''
    mkdir -p $out/etc
    echo "${hostName}" > $out/etc/hostname
    echo "export PATH=${sw}/bin" > $out/etc/profile
    ${app}/bin/demo-app > $out/etc/motd
  '';
  toplevel = mk "nixos-system-${hostName}-24.05" ''
    mkdir -p $out
    ln -s ${kernel}/bzImage $out/kernel
    ln -s ${kernel}/lib/modules $out/kernel-modules
    ln -s ${initrd}/initrd $out/initrd
    ln -s ${etc}/etc $out/etc
    ln -s ${sw} $out/sw
    printf '#!${bb}/bin/sh\nexport PATH=${sw}/bin\nexec demo-app\n' > $out/init
    chmod +x $out/init
    # As in NixOS: the boot loader adds init=; kernel-params holds only the rest.
    echo "${knobs.kernelParams}" > $out/kernel-params
    echo "24.05-demo" > $out/nixos-version
    echo "${system}" > $out/system
  '';
in {
  inherit packages;
  config.system.build = {
    inherit toplevel kernel;
    initialRamdisk = initrd;
  };
}
