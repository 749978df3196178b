// Builds the reference CNI plugins the `kubelet` tests' nodes chain after
// `starling` (portmap) and the CRI calls (loopback), at a release that
// speaks CNI 1.1.0 (STATUS); Debian's 1.1.1 stops at 1.0.0. See ../cluster.sh.
module starling.dev/tests/k8s/plugins

go 1.24.2

require (
	github.com/containernetworking/cni v1.3.0 // indirect
	github.com/containernetworking/plugins v1.9.0 // indirect
	github.com/coreos/go-iptables v0.8.0 // indirect
	github.com/mattn/go-shellwords v1.0.12 // indirect
	github.com/pkg/errors v0.9.1 // indirect
	github.com/vishvananda/netlink v1.3.1 // indirect
	github.com/vishvananda/netns v0.0.5 // indirect
	golang.org/x/sys v0.35.0 // indirect
	sigs.k8s.io/knftables v0.0.18 // indirect
)

tool (
	github.com/containernetworking/plugins/plugins/main/loopback
	github.com/containernetworking/plugins/plugins/meta/portmap
)
