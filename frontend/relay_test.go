package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// fakeAgent listens on a temporary socket and runs serve on each connection.
func fakeAgent(t *testing.T, serve func(c *net.UnixConn)) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "cni.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.AcceptUnix()
			if err != nil {
				return
			}
			serve(c)
		}
	}()
	t.Cleanup(func() { l.Close(); <-done })
	return path
}

// readRequest reads the request to its end (the front end shuts its write side).
func readRequest(t *testing.T, c *net.UnixConn) []byte {
	data, err := io.ReadAll(c)
	if err != nil {
		t.Errorf("reading the request: %v", err)
	}
	return data
}

var env = [][2]string{{"CNI_COMMAND", "ADD"}, {"CNI_ARGS", `A="b";C=é`}, {"ETCD_ENDPOINTS", "https://198.18.0.2:2379"}}

func TestFramingOfRequestAndReply(t *testing.T) {
	stdin := []byte("{\"cniVersion\": \"1.0.0\"}\n\nwith blank lines\x00\xff")
	got := make(chan []byte, 1)
	path := fakeAgent(t, func(c *net.UnixConn) {
		defer c.Close()
		got <- readRequest(t, c)
		c.Write([]byte("+\n3 6\n{\"a\":1"))
	})
	before := time.Now()
	r := relay(path, "tortie-ipam", env, stdin, 2*time.Second, 25*time.Second)
	if r.fallback || r.err != nil || r.status != 3 || string(r.stdout) != `{"a":1` {
		t.Fatalf("reply %+v", r)
	}
	req := <-got
	head, rest, _ := bytes.Cut(req, []byte("\n"))
	envLine, data, _ := bytes.Cut(rest, []byte("\n"))
	fields := strings.Fields(string(head))
	if len(fields) != 3 || fields[0] != "tortie-ipam" {
		t.Fatalf("first line %q", head)
	}
	acceptBy, _ := strconv.ParseInt(fields[1], 10, 64)
	answerBy, _ := strconv.ParseInt(fields[2], 10, 64)
	if d := acceptBy - before.UnixMilli(); d < 1990 || d > 2100 {
		t.Errorf("accept-by is now + %d ms, want 2000", d)
	}
	if d := answerBy - acceptBy; d < 22990 || d > 23010 {
		t.Errorf("answer-by is accept-by + %d ms, want 23000", d)
	}
	var decoded map[string]string
	if err := json.Unmarshal(envLine, &decoded); err != nil {
		t.Fatalf("environment line %q: %v", envLine, err)
	}
	want := map[string]string{"CNI_COMMAND": "ADD", "CNI_ARGS": `A="b";C=é`, "ETCD_ENDPOINTS": "https://198.18.0.2:2379"}
	if fmt.Sprint(decoded) != fmt.Sprint(want) || bytes.ContainsRune(envLine, 'é') {
		t.Errorf("environment %q", envLine)
	}
	if !bytes.Equal(data, stdin) {
		t.Errorf("stdin %q, want %q", data, stdin)
	}
}

func TestForwardedKeepsOnlyPluginSettings(t *testing.T) {
	got := forwarded([]string{"PATH=/bin", "CNI_COMMAND=DEL", "ETCD_KEY_FILE=/k=v", "HOME=/root", "CNI_X"})
	if fmt.Sprint(got) != "[[CNI_COMMAND DEL] [ETCD_KEY_FILE /k=v]]" {
		t.Errorf("forwarded %v", got)
	}
}

func TestPartialReads(t *testing.T) {
	answer := "+\n0 40\n" + strings.Repeat("x", 40)
	path := fakeAgent(t, func(c *net.UnixConn) {
		defer c.Close()
		readRequest(t, c)
		for i := range answer { // one byte per write, so every read sees a piece
			c.Write([]byte{answer[i]})
			time.Sleep(time.Millisecond)
		}
	})
	r := relay(path, "tortie", env, []byte("{}"), 2*time.Second, 5*time.Second)
	if r.err != nil || r.status != 0 || string(r.stdout) != strings.Repeat("x", 40) {
		t.Fatalf("reply %+v", r)
	}
}

func TestNobodyToAskFallsBack(t *testing.T) {
	dir := t.TempDir()
	t.Run("missing socket", func(t *testing.T) {
		if r := relay(filepath.Join(dir, "absent.sock"), "tortie", env, nil, time.Second, time.Second); !r.fallback {
			t.Fatalf("reply %+v", r)
		}
	})
	t.Run("connection refused", func(t *testing.T) {
		path := filepath.Join(dir, "dead.sock")
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		l.SetUnlinkOnClose(false) // a dead agent's socket file stays behind
		l.Close()
		if r := relay(path, "tortie", env, nil, time.Second, time.Second); !r.fallback {
			t.Fatalf("reply %+v", r)
		}
	})
	t.Run("permission denied", func(t *testing.T) {
		if os.Geteuid() == 0 {
			t.Skip("root is never denied a socket; runs as a normal user")
		}
		path := fakeAgent(t, func(c *net.UnixConn) { c.Close() })
		os.Chmod(path, 0)
		if r := relay(path, "tortie", env, nil, time.Second, time.Second); !r.fallback {
			t.Fatalf("reply %+v", r)
		}
	})
	t.Run("unusable path", func(t *testing.T) {
		path := "/" + strings.Repeat("x", 200) // longer than sun_path: not "nobody there"
		r := relay(path, "tortie", env, nil, time.Second, time.Second)
		if r.fallback || r.err == nil || r.err.code != 11 || r.err.msg != msgLost {
			t.Fatalf("reply %+v", r)
		}
	})
}

func TestOversizedReplyIsRefused(t *testing.T) {
	for name, answer := range map[string]string{
		"byte count over the cap": fmt.Sprintf("+\n0 %d\n", maxReply+1),
		"endless status line":     "+\n" + strings.Repeat("7", 1<<20),
	} {
		t.Run(name, func(t *testing.T) {
			path := fakeAgent(t, func(c *net.UnixConn) {
				defer c.Close()
				readRequest(t, c)
				c.Write([]byte(answer))
			})
			r := relay(path, "tortie", env, nil, 2*time.Second, 5*time.Second)
			if r.fallback || r.err == nil || r.err.code != 11 || r.status != 1 {
				t.Fatalf("reply %+v", r)
			}
		})
	}
	r := relay(fakeAgent(t, func(c *net.UnixConn) {
		defer c.Close()
		readRequest(t, c)
		c.Write([]byte(fmt.Sprintf("+\n0 %d\n", maxReply+1)))
	}), "tortie", env, nil, 2*time.Second, 5*time.Second)
	if r.err.msg != msgLarge {
		t.Errorf("message %q", r.err.msg)
	}
}

func TestAgentClosesEarly(t *testing.T) {
	for name, answer := range map[string]string{
		"before +":              "",
		"after +":               "+\n",
		"inside the status":     "+\n0 1",
		"inside the stdout":     "+\n0 10\n{\"a\"",
		"an answer without a +": "0 2\n{}",
		"more than announced":   "+\n0 2\n{}{}",
	} {
		t.Run(name, func(t *testing.T) {
			path := fakeAgent(t, func(c *net.UnixConn) {
				defer c.Close()
				readRequest(t, c)
				c.Write([]byte(answer))
			})
			r := relay(path, "tortie", env, nil, 2*time.Second, 5*time.Second)
			if r.fallback || r.err == nil || r.err.code != 11 || r.err.msg != msgClosed || r.err.details != path {
				t.Fatalf("reply %+v", r)
			}
		})
	}
}

func TestAcceptTimeoutFallsBackAndTheAgentCannotStartLate(t *testing.T) {
	late := make(chan error, 1)
	path := fakeAgent(t, func(c *net.UnixConn) {
		defer c.Close()
		readRequest(t, c)
		time.Sleep(400 * time.Millisecond) // a frozen agent wakes up after accept-by
		_, err := c.Write([]byte("+\n"))
		late <- err
	})
	r := relay(path, "tortie", env, []byte("{}"), 150*time.Millisecond, 5*time.Second)
	if !r.fallback {
		t.Fatalf("reply %+v", r)
	}
	if err := <-late; !errors.Is(err, syscall.EPIPE) {
		t.Fatalf("the agent's late + was not refused: %v", err)
	}
}

func TestAgentThatNeverAcceptsFallsBack(t *testing.T) {
	path := filepath.Join(t.TempDir(), "frozen.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close() // listening, never accepting: a stopped agent
	if r := relay(path, "tortie", env, []byte("{}"), 150*time.Millisecond, time.Second); !r.fallback {
		t.Fatalf("reply %+v", r)
	}
}

func TestAnswerTimeoutIsCode11(t *testing.T) {
	late := make(chan error, 1)
	path := fakeAgent(t, func(c *net.UnixConn) {
		defer c.Close()
		readRequest(t, c)
		c.Write([]byte("+\n"))
		time.Sleep(500 * time.Millisecond)
		_, err := c.Write([]byte("0 2\n{}"))
		late <- err
	})
	r := relay(path, "tortie", env, nil, time.Second, 200*time.Millisecond+time.Millisecond)
	if r.fallback || r.err == nil || r.err.code != 11 || r.err.msg != msgLate {
		t.Fatalf("reply %+v", r)
	}
	if err := <-late; !errors.Is(err, syscall.EPIPE) {
		t.Fatalf("the agent's late answer did not fail: %v", err)
	}
}

// giveUp decides on what is buffered when a deadline passes.
func TestDeadlineDecidesOnWhatIsBuffered(t *testing.T) {
	for buffered, want := range map[string]string{
		"":                "fallback",
		"+":               "fallback",
		"+\n":             msgLate,
		"+\n0 4\n{}":      msgLate,
		"+\n5 2\n{}":      "status 5 {}",
		"x":               msgClosed,
		"+\n0 99999999\n": msgLarge,
	} {
		fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
		if err != nil {
			t.Fatal(err)
		}
		syscall.Write(fds[1], []byte(buffered))
		f := os.NewFile(uintptr(fds[0]), "front")
		fc, _ := net.FileConn(f)
		f.Close()
		r := giveUp(fc.(*net.UnixConn), nil, "/s")
		var got string
		switch {
		case r.fallback:
			got = "fallback"
		case r.err != nil:
			got = r.err.msg
		default:
			got = fmt.Sprintf("status %d %s", r.status, r.stdout)
		}
		if got != want {
			t.Errorf("buffered %q: %s, want %s", buffered, got, want)
		}
		fc.Close()
		syscall.Close(fds[1])
	}
}

func TestSocketPath(t *testing.T) {
	for config, want := range map[string]string{
		`{}`:                                   defaultSocket,
		`{"agent_socket": "/run/x.sock"}`:      "/run/x.sock",
		`{"ipam": {"agent_socket": "/run/y"}}`: "/run/y",
		`{"agent_socket": null, "ipam": {}}`:   defaultSocket,
		`{"agent_socket": "relative"}`:         "in-process",
		`{"agent_socket": 5}`:                  "in-process",
		`[]`:                                   "in-process",
	} {
		decoded, _ := decodeConfig([]byte(config))
		got, ok := socketPath(decoded)
		if !ok {
			got = "in-process"
		}
		if got != want {
			t.Errorf("%s: %s, want %s", config, got, want)
		}
	}
	for _, bad := range []string{"", "{", `{"a": 1} x`, "\xff{}"} {
		if _, ok := decodeConfig([]byte(bad)); ok {
			t.Errorf("%q decoded", bad)
		}
	}
}

func TestTimeoutsFromTheEnvironment(t *testing.T) {
	for value, want := range map[string]time.Duration{
		"0.25": 250 * time.Millisecond, "3": 3 * time.Second, "": defaultAccept, "x": defaultAccept,
		"-1": defaultAccept, "0": defaultAccept, "NaN": defaultAccept,
	} {
		t.Setenv(acceptEnv, value)
		if got := timeout(acceptEnv, defaultAccept); got != want {
			t.Errorf("%q: %v, want %v", value, got, want)
		}
	}
}

func TestErrorDocumentIsPythonsJSON(t *testing.T) {
	var config interface{}
	json.Unmarshal([]byte(`{"cniVersion": "0.4.0"}`), &config)
	got := string(errorDocument(config, &relayError{11, `say "why"`, "é\x01😀"}))
	want := `{"cniVersion": "0.4.0", "code": 11, "msg": "say \"why\"", "details": "\u00e9\u0001\ud83d\ude00"}` + "\n"
	if got != want {
		t.Errorf("got %s want %s", got, want)
	}
	json.Unmarshal([]byte(`{"cniVersion": "9"}`), &config)
	if !strings.HasPrefix(string(errorDocument(config, &relayError{11, "m", "d"})), `{"cniVersion": "1.1.0"`) {
		t.Error("an unknown cniVersion is not answered with 1.1.0")
	}
}
