#!/bin/busybox sh
# Init of the sockmesh test VM (see xtask/src/vm.rs), run twice as PID 1:
#  stage 1, from the initramfs: load the modules in /modules/order, mount the host's
#    `/` (virtio-9p, read-only) under a tmpfs overlay at /newroot, mount the guest's
#    own /proc, /sys, /dev, /run, /tmp and cgroup2 (alone at /sys/fs/cgroup) there,
#    copy the job's files in, then switch_root into it;
#  stage 2, in the new root: loopback up, run the job's command with its output on
#    the virtio-serial ports `out` and `err`, report "started <uptime>" and
#    "exit <status>" (or "error <why>") on the port `status`, and reboot, which ends
#    qemu (-no-reboot).
# bpffs is left unmounted: the agent mounts /sys/fs/bpf itself.
# /job (written by vm.rs) sets VM_MODULES, VM_CWD, VM_STAGE, VM_COPY_IN, vm_command.

bb=/bin/busybox
status_port=/dev/console

say() { echo "$*" > "$status_port"; }
# Timestamped in the guest's console log (shown with SOCKMESH_VM_APPEND=loglevel=7).
mark() { echo "vm: $*" > /dev/kmsg; }
die() {
    say "error $*"
    $bb reboot -f
    exit 1
}

find_ports() {
    for _ in $($bb seq 100); do
        for port in /sys/class/virtio-ports/*; do
            [ -e "$port/name" ] || continue
            case "$($bb cat "$port/name")" in
            out) out_port=/dev/${port##*/} ;;
            err) err_port=/dev/${port##*/} ;;
            status) status_port=/dev/${port##*/} ;;
            esac
        done
        [ -n "$out_port" ] && [ -n "$err_port" ] && [ "$status_port" != /dev/console ] && return
        $bb sleep 0.05
    done
    die "virtio-serial ports out, err, status not found"
}

stage1() {
    $bb mount -t proc proc /proc
    $bb mount -t sysfs sysfs /sys
    $bb mount -t devtmpfs devtmpfs /dev
    while read -r module; do
        $bb insmod "/modules/$module" || die "insmod $module failed"
    done < /modules/order
    mark "modules loaded"
    . /job
    $bb mkdir -p /lower /rw /newroot
    $bb mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot /lower ||
        die "mounting the host's / over 9p failed"
    $bb mount -t tmpfs -o size=90% tmpfs /rw
    $bb mkdir -p /rw/upper /rw/work
    $bb mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot ||
        die "mounting the overlay failed"
    n=/newroot
    mark "overlay mounted"
    $bb mount -t proc proc $n/proc
    $bb mount -t sysfs sysfs $n/sys
    $bb mount -t cgroup2 cgroup2 $n/sys/fs/cgroup || die "mounting cgroup2 failed"
    $bb mount -t devtmpfs devtmpfs $n/dev
    $bb mkdir -p $n/dev/pts $n/dev/shm
    $bb mount -t devpts devpts $n/dev/pts
    $bb mount -t tmpfs -o mode=1777 tmpfs $n/dev/shm
    $bb mount -t tmpfs -o mode=755 tmpfs $n/run
    $bb mkdir -p $n/run/netns $n/run/vm
    $bb mount -t tmpfs -o mode=1777 tmpfs $n/tmp
    # The kernel's module autoloading (iptables, nft, ...) runs the host's modprobe
    # against the guest kernel's modules, extracted on the host and seen over 9p.
    $bb mkdir -p "$n/lib/modules/${VM_MODULES##*/}"
    $bb mount --bind "$n$VM_MODULES" "$n/lib/modules/${VM_MODULES##*/}"
    # The host staged the Nth file of VM_COPY_IN as $VM_STAGE/N. Written beside its
    # path and renamed over it, it lands in the tmpfs without a copy-up of the
    # original: later opens do not cross 9p, compile-time absolute paths still work.
    # After the mounts, so that a file under /tmp lands in the guest's /tmp.
    i=0
    while read -r path; do
        [ -n "$path" ] || continue
        $bb mkdir -p "$n${path%/*}" && $bb cp -p "/lower$VM_STAGE/$i" "$n$path.vm-copy" &&
            $bb mv "$n$path.vm-copy" "$n$path" ||
            die "copying $path into the guest failed"
        i=$((i + 1))
    done <<EOF
$VM_COPY_IN
EOF
    mark "files copied in"
    # Stage 2 runs on the tmpfs copy of busybox: executing it over 9p costs ~0.5 s.
    $bb cp /init /job $bb $n/run/vm/
    $bb umount /proc /sys /dev
    exec $bb switch_root $n /run/vm/busybox sh /run/vm/init stage2
}

stage2() {
    bb=/run/vm/busybox
    mark "stage 2"
    . /run/vm/job
    $bb hostname sockmesh-vm
    $bb ip link set lo up || die "ip link set lo up failed"
    find_ports
    cd "$VM_CWD" || die "no directory $VM_CWD in the guest"
    read -r uptime _ < /proc/uptime
    mark "command starts"
    say "started $uptime"
    (vm_command) < /dev/null > "$out_port" 2> "$err_port"
    say "exit $?"
    $bb reboot -f
}

if [ "$1" = stage2 ]; then stage2; else stage1; fi
