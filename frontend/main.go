// Command tortie is the executable a container runtime execs for both of Tortie's CNI plugins,
// `tortie` and `tortie-ipam` (the name it is called by decides which). It owns only the hand-over:
// it relays the call, as it came, to the node's felix-agent over its unix socket (exchange version
// 2, see relay.go), prints the agent's answer, and when no agent answers it execs the Python
// in-process path with the same environment and stdin. It must not interpret the call: the agent
// and the in-process path run the same Python skeleton, so both give the same answer.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"
)

// Set at build time (go build -ldflags "-X main.python=... -X main.packageRoot=..."): the
// interpreter of the installation and the directory that holds the cni_plugins package. Nothing
// at run time (environment, working directory) can choose another interpreter.
var (
	python      = ""
	packageRoot = ""
)

const (
	defaultSocket = "/run/tortie/cni.sock"
	acceptEnv     = "TORTIE_RELAY_ACCEPT_TIMEOUT"
	answerEnv     = "TORTIE_RELAY_ANSWER_TIMEOUT"
)

// inProcessProgram runs the call in the Python process without trying the relay again.
// sys.argv is ['-c', packageRoot, plugin].
const inProcessProgram = "import sys; sys.path.insert(1, sys.argv[1]); " +
	"from cni_plugins.inprocess import main; sys.exit(main(sys.argv[2]))"

func main() {
	plugin := filepath.Base(os.Args[0])
	if plugin != "tortie" && plugin != "tortie-ipam" {
		fmt.Fprintf(os.Stderr, "tortie front end: called as %q; install it as tortie or tortie-ipam\n", plugin)
		os.Exit(1)
	}
	if os.Getenv("CNI_COMMAND") == "" {
		inProcess(plugin, nil) // run by a human: the plugin describes itself, stdin untouched
	}
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		inProcess(plugin, nil) // the in-process skeleton reports the unreadable stdin
	}
	config, ok := decodeConfig(data)
	if !ok {
		inProcess(plugin, data) // not a JSON document: the in-process path says why
	}
	path, ok := socketPath(config)
	if !ok {
		inProcess(plugin, data) // agent_socket unusable: the in-process path reports the config error
	}
	accept, answer := timeout(acceptEnv, defaultAccept), timeout(answerEnv, defaultAnswer)
	reply := relay(path, plugin, forwarded(os.Environ()), data, accept, answer)
	if reply.fallback {
		inProcess(plugin, data)
	}
	if reply.err != nil {
		reply.stdout = errorDocument(config, reply.err)
	}
	for out := reply.stdout; len(out) > 0; {
		n, err := os.Stdout.Write(out)
		if err != nil {
			break
		}
		out = out[n:]
	}
	os.Exit(reply.status)
}

func decodeConfig(data []byte) (interface{}, bool) {
	if !utf8.Valid(data) { // Python's strict decode refuses it: the in-process path reports it
		return nil, false
	}
	var config interface{}
	if err := json.Unmarshal(data, &config); err != nil {
		return nil, false
	}
	return config, true
}

// socketPath is the agent socket a configuration names (agent_socket at the top level, else in
// ipam), the default when it names none; false when the value is not an absolute path.
func socketPath(config interface{}) (string, bool) {
	top, ok := config.(map[string]interface{})
	if !ok {
		return "", false
	}
	value, present := top["agent_socket"]
	if !present || value == nil {
		if ipam, ok := top["ipam"].(map[string]interface{}); ok {
			value, present = ipam["agent_socket"]
		}
	}
	if !present || value == nil {
		return defaultSocket, true
	}
	path, ok := value.(string)
	return path, ok && strings.HasPrefix(path, "/")
}

// timeout reads a bound in seconds (decimal) from the environment; the default when unset or not
// a positive number.
func timeout(name string, fallback time.Duration) time.Duration {
	seconds, err := strconv.ParseFloat(os.Getenv(name), 64)
	if err != nil || !(seconds > 0) || seconds > 1e6 {
		return fallback
	}
	return time.Duration(seconds * float64(time.Second))
}

// forwarded keeps the CNI_* and ETCD_* variables, in the order they came.
func forwarded(environ []string) [][2]string {
	var kept [][2]string
	for _, kv := range environ {
		if strings.HasPrefix(kv, "CNI_") || strings.HasPrefix(kv, "ETCD_") {
			if k, v, ok := strings.Cut(kv, "="); ok {
				kept = append(kept, [2]string{k, v})
			}
		}
	}
	return kept
}

// errorDocument is a CNI error as the Python relay writes it.
func errorDocument(config interface{}, e *relayError) []byte {
	version := "1.1.0"
	if top, ok := config.(map[string]interface{}); ok {
		if v, ok := top["cniVersion"].(string); ok && (v == "0.4.0" || v == "1.0.0" || v == "1.1.0") {
			version = v
		}
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, `{"cniVersion": %s, "code": %d, "msg": %s, "details": %s}`+"\n",
		quote(version), e.code, quote(e.msg), quote(e.details))
	return b.Bytes()
}

// quote encodes a JSON string as Python's json.encoder.encode_basestring_ascii does.
func quote(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"':
			b.WriteString(`\"`)
		case r == '\\':
			b.WriteString(`\\`)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\r':
			b.WriteString(`\r`)
		case r == '\t':
			b.WriteString(`\t`)
		case r == '\b':
			b.WriteString(`\b`)
		case r == '\f':
			b.WriteString(`\f`)
		case r >= 0x20 && r <= 0x7e:
			b.WriteRune(r)
		case r > 0xffff:
			r -= 0x10000
			fmt.Fprintf(&b, `\u%04x\u%04x`, 0xd800+(r>>10), 0xdc00+(r&0x3ff))
		default:
			fmt.Fprintf(&b, `\u%04x`, r)
		}
	}
	b.WriteByte('"')
	return b.String()
}

// inProcess replaces this process with the Python in-process path: same environment, and stdin
// the bytes already read (data), or the untouched stdin when nil. Does not return.
func inProcess(plugin string, data []byte) {
	if python == "" {
		fail("this front end was built without its Python interpreter (go build -ldflags -X main.python=...)")
	}
	if data != nil {
		fd, err := stdinFile(data)
		if err != nil {
			fail("cannot hand stdin to the in-process path: " + err.Error())
		}
		if err := syscall.Dup3(fd, 0, 0); err != nil {
			fail("cannot hand stdin to the in-process path: " + err.Error())
		}
	}
	// -I: no PYTHON* variables, no user site, no working directory on sys.path.
	argv := []string{python, "-I", "-c", inProcessProgram, packageRoot, plugin}
	err := syscall.Exec(python, argv, os.Environ())
	fail(fmt.Sprintf("cannot start the in-process path %s: %v", python, err))
}

// stdinFile is a descriptor that reads back data to its end: a pipe when data fits in one (the
// write end closes at exec), else an unlinked temporary file.
func stdinFile(data []byte) (int, error) {
	var p [2]int
	if err := syscall.Pipe2(p[:], syscall.O_CLOEXEC); err == nil {
		size, _, errno := syscall.Syscall(syscall.SYS_FCNTL, uintptr(p[1]), syscall.F_GETPIPE_SZ, 0)
		if errno == 0 && int(size) < len(data) {
			size, _, errno = syscall.Syscall(syscall.SYS_FCNTL, uintptr(p[1]), syscall.F_SETPIPE_SZ, uintptr(len(data)))
		}
		if errno == 0 && int(size) >= len(data) {
			for rest := data; len(rest) > 0; {
				n, err := syscall.Write(p[1], rest)
				if err != nil {
					return 0, err
				}
				rest = rest[n:]
			}
			return p[0], nil
		}
		syscall.Close(p[0])
		syscall.Close(p[1])
	}
	f, err := os.CreateTemp("", "tortie-stdin-")
	if err != nil {
		return 0, err
	}
	os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		return 0, err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return 0, err
	}
	return int(f.Fd()), nil
}

// fail reports a front end that cannot serve the call at all (an installation problem) as a CNI
// internal error.
func fail(msg string) {
	os.Stdout.Write(errorDocument(nil, &relayError{199, msg, os.Args[0]}))
	os.Exit(1)
}
