// Command cnic drives CNI plugins through libcni exactly as a container runtime does: it loads a
// network configuration from a file, runs the plugin chain for ADD, CHECK or DEL, and keeps the
// ADD result in libcni's cache so that CHECK and DEL receive it as prevResult.
//
// Usage:
//
//	cnic add|check|del <conflist-file> <netns-path> [--container-id ID] [--ifname eth0]
//	     [--cache-dir DIR] [--cap-args JSON] [--args K=V;...]
//
// Plugins are searched in CNI_PATH. ADD prints the result JSON on stdout; any failure prints the
// error on stderr and exits 1. Build (GOPATH mode, against Debian's golang-github-appc-cni-dev):
//
//	GO111MODULE=off GOPATH=<tmp>:/usr/share/gocode go build -o cnic .
package main

import (
	"context"
	"crypto/sha512"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
)

type options struct {
	command     string
	configFile  string
	netns       string
	containerID string
	ifname      string
	cacheDir    string
	capArgs     string
	args        string
}

const usage = "usage: cnic add|check|del <conflist-file> <netns-path> [--container-id ID] [--ifname eth0]" +
	" [--cache-dir DIR] [--cap-args JSON] [--args K=V;...]"

// parseOptions accepts the flags before, between or after the three positional arguments.
func parseOptions(argv []string) (*options, error) {
	opts := &options{}
	fs := flag.NewFlagSet("cnic", flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	fs.StringVar(&opts.containerID, "container-id", "", "container ID (default: cnitool-<hash of netns path>)")
	fs.StringVar(&opts.ifname, "ifname", "eth0", "interface name inside the container")
	fs.StringVar(&opts.cacheDir, "cache-dir", "", "libcni cache directory (default /var/lib/cni)")
	fs.StringVar(&opts.capArgs, "cap-args", "", "capability arguments, a JSON object")
	fs.StringVar(&opts.args, "args", "", "CNI_ARGS, K=V;K2=V2")

	var positional []string
	for {
		if err := fs.Parse(argv); err != nil {
			return nil, err
		}
		argv = fs.Args()
		if len(argv) == 0 {
			break
		}
		positional = append(positional, argv[0])
		argv = argv[1:]
	}
	if len(positional) != 3 {
		return nil, fmt.Errorf("%s", usage)
	}
	opts.command, opts.configFile, opts.netns = positional[0], positional[1], positional[2]
	if opts.containerID == "" {
		// cnitool's convention, so that the same netns maps to the same attachment.
		sum := sha512.Sum512([]byte(opts.netns))
		opts.containerID = fmt.Sprintf("cnitool-%x", sum[:10])
	}
	return opts, nil
}

// loadConfList reads a .conflist, or wraps a single-plugin .conf/.json in a list as libcni does.
func loadConfList(path string) (*libcni.NetworkConfigList, error) {
	if filepath.Ext(path) == ".conflist" {
		return libcni.ConfListFromFile(path)
	}
	conf, err := libcni.ConfFromFile(path)
	if err != nil {
		return nil, err
	}
	return libcni.ConfListFromConf(conf)
}

func runtimeConf(opts *options) (*libcni.RuntimeConf, error) {
	rt := &libcni.RuntimeConf{
		ContainerID: opts.containerID,
		NetNS:       opts.netns,
		IfName:      opts.ifname,
	}
	if opts.args != "" {
		for _, pair := range strings.Split(opts.args, ";") {
			if pair == "" {
				continue
			}
			kv := strings.SplitN(pair, "=", 2)
			if len(kv) != 2 {
				return nil, fmt.Errorf("invalid --args entry %q: want K=V", pair)
			}
			rt.Args = append(rt.Args, [2]string{kv[0], kv[1]})
		}
	}
	if opts.capArgs != "" {
		if err := json.Unmarshal([]byte(opts.capArgs), &rt.CapabilityArgs); err != nil {
			return nil, fmt.Errorf("invalid --cap-args: %w", err)
		}
	}
	return rt, nil
}

func run(opts *options) error {
	list, err := loadConfList(opts.configFile)
	if err != nil {
		return fmt.Errorf("loading %s: %w", opts.configFile, err)
	}
	rt, err := runtimeConf(opts)
	if err != nil {
		return err
	}
	cni := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv("CNI_PATH")), opts.cacheDir, nil)
	ctx := context.Background()

	switch opts.command {
	case "add":
		result, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			return err
		}
		return result.Print()
	case "check":
		return cni.CheckNetworkList(ctx, list, rt)
	case "del":
		return cni.DelNetworkList(ctx, list, rt)
	}
	return fmt.Errorf("unknown command %q\n%s", opts.command, usage)
}

func main() {
	opts, err := parseOptions(os.Args[1:])
	if err == nil {
		err = run(opts)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
