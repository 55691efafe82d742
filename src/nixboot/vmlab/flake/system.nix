# Raw derivations laid out like a NixOS toplevel: kernel, initrd, init, kernel-params, sw.
{ tag, system ? "x86_64-linux" }:
let
  # builtins.path: each file becomes its own content-addressed store path, so the kernel and
  # initrd stay the same store paths from one generation to the next.
  # a directory with bin/busybox and bin/sh -> busybox: busybox picks its applet by argv[0]
  bbDir = builtins.path { path = ./busybox; name = "busybox-static"; };
  bb = "${bbDir}/bin/busybox";
  kernelFile = builtins.path { path = ./kernel; name = "linux-bzImage"; };
  initrdFile = builtins.path { path = ./initrd; name = "initrd-nixboot-e2e"; };
  stage1 = builtins.path { path = ./stage1.sh; name = "nixboot-stage1.sh"; };
  mk0 = name: env: script: derivation ({
    inherit name system;
    builder = "${bbDir}/bin/sh";
    args = [ "-e" "-c" script ];
  } // env);
  # every other derivation finds the busybox applets (cat, ln, ...) on PATH
  mk = name: env: mk0 name ({ PATH = "${applets}/bin"; } // env);
  # deterministic contents: the same inputs give the same NAR on every builder
  pkg = name: kib: mk name { } ''
    ${bb} mkdir -p $out/bin $out/share
    ${bb} yes "${name}: nixboot e2e payload" | ${bb} head -c ${toString (kib * 1024)} > $out/share/${name}.txt
    printf '#!${applets}/bin/sh\necho ${name}\n' > $out/bin/${name}
    ${bb} chmod +x $out/bin/${name}
  '';
  applets = mk0 "busybox-applets" { } ''
    ${bb} mkdir -p $out/bin
    for a in $(${bb} --list); do ${bb} ln -s ${bb} $out/bin/$a; done
  '';
  pkgA = pkg "pkg-a" 1024;
  pkgB = pkg "pkg-b" 1024;
  # the package that changes between generations (the `tag` knob)
  pkgD = mk "pkg-d-${tag}" { } ''
    ${bb} mkdir -p $out/bin $out/share
    ${bb} yes "pkg-d ${tag}: nixboot e2e payload" | ${bb} head -c 524288 > $out/share/pkg-d.txt
    printf '#!${applets}/bin/sh\necho pkg-d ${tag}\n' > $out/bin/pkg-d
    ${bb} chmod +x $out/bin/pkg-d
  '';
  sw = mk "system-path" { } ''
    ${bb} mkdir -p $out/bin
    for p in ${pkgA} ${pkgB} ${pkgD}; do for f in $p/bin/*; do ${bb} ln -s $f $out/bin/; done; done
  '';
  kernelParams = "console=ttyS0,115200 panic=-1 loglevel=4 nixboot.onfail=poweroff";
  toplevel = mk "nixos-system-e2e-${tag}" { } ''
    ${bb} mkdir -p $out
    ${bb} ln -s ${kernelFile} $out/kernel
    ${bb} ln -s ${initrdFile} $out/initrd
    ${bb} ln -s ${sw} $out/sw
    echo "${kernelParams}" > $out/kernel-params
    echo "e2e-${tag}" > $out/nixos-version
    # stage 2: activate (the current-system link, as NixOS does), report `booted`, power off
    cat > $out/init <<INIT
#!${applets}/bin/sh
export PATH=${applets}/bin:${sw}/bin
mkdir -p /proc /sys /dev /run /tmp
grep -q ' /proc ' /proc/mounts 2>/dev/null || mount -t proc proc /proc
ln -sfn $out /run/current-system
echo "NIXBOOT-STAGE2 system=$out version=\$(cat $out/nixos-version) pkg-d=\$(pkg-d) uptime=\$(cut -d' ' -f1 /proc/uptime)"
sh ${stage1} report booted done "$out"
echo "NIXBOOT-BOOTED uptime=\$(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f
INIT
    ${bb} chmod +x $out/init
  '';
in
{
  config.system.build = { inherit toplevel; kernel = kernelFile; initialRamdisk = initrdFile; };
}
