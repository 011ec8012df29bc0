package main

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
)

// build compiles the front end as dir/tortie and dir/tortie-ipam, with a fake interpreter that
// prints its arguments, CNI_COMMAND and its stdin: what the in-process path would be given.
func build(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	fake := filepath.Join(dir, "python")
	script := "#!/bin/sh\necho \"args: $*\"\necho \"command: $CNI_COMMAND\"\nexec cat\n"
	if err := os.WriteFile(fake, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "tortie")
	cmd := exec.Command(filepath.Join(runtime.GOROOT(), "bin", "go"), "build", "-trimpath", "-buildvcs=false", "-o", out,
		"-ldflags", "-X main.python="+fake+" -X main.packageRoot=/pkg/root", ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if msg, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, msg)
	}
	if err := os.Symlink(out, filepath.Join(dir, "tortie-ipam")); err != nil {
		t.Fatal(err)
	}
	return dir
}

func run(t *testing.T, exe string, env []string, stdin []byte) (string, int) {
	t.Helper()
	cmd := exec.Command(exe)
	cmd.Env = env
	cmd.Stdin = bytes.NewReader(stdin)
	var out bytes.Buffer
	cmd.Stdout = &out
	err := cmd.Run()
	if exit, ok := err.(*exec.ExitError); ok {
		return out.String(), exit.ExitCode()
	}
	if err != nil {
		t.Fatal(err)
	}
	return out.String(), 0
}

func TestExecutable(t *testing.T) {
	dir := build(t)
	absent := filepath.Join(dir, "absent.sock")
	config := []byte(`{"cniVersion": "1.0.0", "agent_socket": "` + absent + `"}` + "\n")
	large := append([]byte(`{"cniVersion": "1.0.0", "agent_socket": "`+absent+`", "x": "`),
		bytes.Repeat([]byte("y"), 3<<20)...)
	large = append(large, []byte(`"}`)...)
	prefix := "args: -I -c " + inProcessProgram + " /pkg/root "

	t.Run("no agent: the in-process path gets the same stdin", func(t *testing.T) {
		for _, plugin := range []string{"tortie", "tortie-ipam"} {
			out, code := run(t, filepath.Join(dir, plugin), []string{"CNI_COMMAND=ADD"}, config)
			if code != 0 || out != prefix+plugin+"\ncommand: ADD\n"+string(config) {
				t.Fatalf("%s: exit %d, output %q", plugin, code, out)
			}
		}
	})
	t.Run("stdin larger than a pipe", func(t *testing.T) {
		out, code := run(t, filepath.Join(dir, "tortie"), []string{"CNI_COMMAND=DEL"}, large)
		if code != 0 || out != prefix+"tortie\ncommand: DEL\n"+string(large) {
			t.Fatalf("exit %d, %d bytes of output", code, len(out))
		}
	})
	t.Run("not a JSON document, or a bad agent_socket: in-process", func(t *testing.T) {
		for _, stdin := range []string{"not json", `{"agent_socket": "relative"}`, ""} {
			out, _ := run(t, filepath.Join(dir, "tortie"), []string{"CNI_COMMAND=ADD"}, []byte(stdin))
			if out != prefix+"tortie\ncommand: ADD\n"+stdin {
				t.Fatalf("%q: output %q", stdin, out)
			}
		}
	})
	t.Run("no CNI_COMMAND: in-process, stdin untouched", func(t *testing.T) {
		out, _ := run(t, filepath.Join(dir, "tortie"), nil, []byte("left for the skeleton"))
		if out != prefix+"tortie\ncommand: \nleft for the skeleton" {
			t.Fatalf("output %q", out)
		}
	})
	t.Run("the agent's answer and exit status", func(t *testing.T) {
		path := fakeAgent(t, func(c *net.UnixConn) {
			defer c.Close()
			readRequest(t, c)
			c.Write([]byte("+\n7 11\n{\"code\": 7}"))
		})
		conf := []byte(`{"cniVersion": "1.0.0", "ipam": {"agent_socket": "` + path + `"}}`)
		out, code := run(t, filepath.Join(dir, "tortie-ipam"), []string{"CNI_COMMAND=ADD"}, conf)
		if code != 7 || out != `{"code": 7}` {
			t.Fatalf("exit %d, output %q", code, out)
		}
	})
	t.Run("an answer that never comes: code 11", func(t *testing.T) {
		release := make(chan struct{})
		path := fakeAgent(t, func(c *net.UnixConn) {
			defer c.Close()
			readRequest(t, c)
			c.Write([]byte("+\n"))
			<-release // a hung agent
		})
		defer close(release)
		conf := []byte(`{"cniVersion": "0.4.0", "agent_socket": "` + path + `"}`)
		out, code := run(t, filepath.Join(dir, "tortie"),
			[]string{"CNI_COMMAND=ADD", answerEnv + "=0.2"}, conf)
		want := `{"cniVersion": "0.4.0", "code": 11, "msg": "` + msgLate + `", "details": "` + path + "\"}\n"
		if code != 1 || out != want {
			t.Fatalf("exit %d, output %q", code, out)
		}
	})
	t.Run("called by another name", func(t *testing.T) {
		other := filepath.Join(dir, "frontend")
		os.Symlink(filepath.Join(dir, "tortie"), other)
		if _, code := run(t, other, []string{"CNI_COMMAND=ADD"}, config); code != 1 {
			t.Fatalf("exit %d", code)
		}
	})
}
