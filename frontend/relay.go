package main

// The front end's side of the relay exchange, version 2 (felix_agent's side is
// cni_plugins/agent_protocol.py), one call per connection:
//
//	request  "<plugin> <accept-by> <answer-by>\n<environment as a JSON object>\n<stdin bytes>",
//	         then the write side is shut; the deadlines are Unix time in milliseconds.
//	reply    "+\n" when (and only when) the agent starts the work, which it does only before
//	         accept-by; then "<exit status> <byte count>\n<stdout bytes>", then it closes.
//
// Why the "+": once it is written the call may have taken effect, so the front end must not run
// it again in-process; before it, the call certainly has not. When accept-by passes without it,
// shutdown(SHUT_RDWR) makes every later write of the agent fail (EPIPE, atomically on AF_UNIX),
// so what is then buffered decides for good: no "+" means the agent never starts, and the
// in-process path may run.

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"syscall"
	"time"
)

const (
	defaultAccept = 2 * time.Second
	defaultAnswer = 25 * time.Second
	maxReply      = 16 << 20 // an answer is a CNI result of a few KiB; refuse more than this
	maxStatusLine = 48
	codeTryAgain  = 11
)

const (
	msgLate   = "the node agent did not answer in time"
	msgClosed = "the node agent closed the connection without an answer"
	msgLost   = "lost the connection to the node agent"
	msgLarge  = "the node agent's answer is too large"
)

type relayError struct {
	code    int
	msg     string
	details string
}

// reply is what the exchange ended with: the agent's answer, an error to print (exit status 1),
// or fallback (no agent started the call: run it in-process).
type reply struct {
	status   int
	stdout   []byte
	err      *relayError
	fallback bool
}

func failed(msg, details string) reply {
	return reply{status: 1, err: &relayError{codeTryAgain, msg, details}}
}

// relay has the agent at path serve one call.
func relay(path, plugin string, env [][2]string, data []byte, accept, answer time.Duration) reply {
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		// Nobody to ask. EAGAIN: the listen backlog is full (a frozen agent); the request was
		// never queued, so the agent cannot start it.
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) ||
			errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EAGAIN) {
			return reply{fallback: true}
		}
		return failed(msgLost, fmt.Sprintf("%s: %v", path, unwrap(err)))
	}
	defer conn.Close()
	now := time.Now()
	acceptBy, answerBy := now.Add(accept), now.Add(answer)
	conn.SetDeadline(acceptBy)
	_, err = conn.Write(request(plugin, acceptBy, answerBy, env, data))
	if err == nil {
		err = conn.CloseWrite()
	}
	if isTimeout(err) { // the agent reads nothing: as good as no "+" by accept-by
		return giveUp(conn, nil, path)
	}
	// Another write error (the agent closed): what it left to read says what happened.
	var buf []byte
	chunk := make([]byte, 65536)
	deadline := acceptBy
	for {
		state := parse(buf)
		switch {
		case state.err != nil:
			return reply{status: 1, err: withDetails(state.err, path)}
		case state.complete:
			return reply{status: state.status, stdout: state.stdout}
		case state.accepted && deadline.Equal(acceptBy):
			deadline = answerBy
			conn.SetReadDeadline(answerBy)
		}
		n, err := conn.Read(chunk[:min(len(chunk), state.want)])
		buf = append(buf, chunk[:n]...)
		switch {
		case err == nil:
		case isTimeout(err):
			return giveUp(conn, buf, path)
		case errors.Is(err, io.EOF):
			if state = parse(buf); state.complete {
				return reply{status: state.status, stdout: state.stdout}
			}
			return failed(msgClosed, path)
		default:
			return failed(msgLost, fmt.Sprintf("%s: %v", path, unwrap(err)))
		}
	}
}

// giveUp ends the exchange at a deadline: shut the socket both ways (the agent's later writes
// fail), then decide on what was already written.
func giveUp(conn *net.UnixConn, buf []byte, path string) reply {
	if raw, err := conn.SyscallConn(); err == nil {
		raw.Control(func(fd uintptr) { syscall.Shutdown(int(fd), syscall.SHUT_RDWR) })
	}
	conn.SetDeadline(time.Time{})
	chunk := make([]byte, 65536)
	for {
		state := parse(buf)
		if state.err != nil {
			return reply{status: 1, err: withDetails(state.err, path)}
		}
		if state.complete {
			return reply{status: state.status, stdout: state.stdout}
		}
		n, err := conn.Read(chunk[:min(len(chunk), state.want)])
		buf = append(buf, chunk[:n]...)
		if err != nil {
			if state = parse(buf); state.complete {
				return reply{status: state.status, stdout: state.stdout}
			}
			if !state.accepted {
				return reply{fallback: true} // never started, and now never will
			}
			return failed(msgLate, path)
		}
	}
}

func request(plugin string, acceptBy, answerBy time.Time, env [][2]string, data []byte) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s %d %d\n{", plugin, acceptBy.UnixMilli(), answerBy.UnixMilli())
	for i, kv := range env {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(quote(kv[0]) + ":" + quote(kv[1]))
	}
	b.WriteString("}\n")
	b.Write(data)
	return b.Bytes()
}

// parsed is what the bytes received so far amount to.
type parsed struct {
	accepted bool // "+\n" came
	complete bool // the whole answer came: status and stdout are set
	status   int
	stdout   []byte
	want     int // how many more bytes may be read (never past the answer's end)
	err      *relayError
}

func parse(buf []byte) parsed {
	if len(buf) < 2 {
		if !bytes.HasPrefix([]byte("+\n"), buf) {
			return parsed{err: &relayError{codeTryAgain, msgClosed, ""}}
		}
		return parsed{want: 2 - len(buf)}
	}
	if buf[0] != '+' || buf[1] != '\n' {
		return parsed{err: &relayError{codeTryAgain, msgClosed, ""}}
	}
	rest := buf[2:]
	end := bytes.IndexByte(rest, '\n')
	if end < 0 {
		if len(rest) >= maxStatusLine {
			return parsed{accepted: true, err: &relayError{codeTryAgain, msgClosed, ""}}
		}
		return parsed{accepted: true, want: maxStatusLine - len(rest)}
	}
	fields := bytes.Split(rest[:end], []byte(" "))
	if len(fields) != 2 || !digits(fields[0]) || !digits(fields[1]) {
		return parsed{accepted: true, err: &relayError{codeTryAgain, msgClosed, ""}}
	}
	status, err1 := strconv.Atoi(string(fields[0]))
	count, err2 := strconv.Atoi(string(fields[1]))
	if err1 != nil || err2 != nil || status > 255 {
		return parsed{accepted: true, err: &relayError{codeTryAgain, msgClosed, ""}}
	}
	if count > maxReply {
		return parsed{accepted: true, err: &relayError{codeTryAgain, msgLarge,
			fmt.Sprintf("%d bytes, more than %d", count, maxReply)}}
	}
	body := rest[end+1:]
	switch {
	case len(body) < count:
		return parsed{accepted: true, want: count - len(body)}
	case len(body) > count:
		return parsed{accepted: true, err: &relayError{codeTryAgain, msgClosed, ""}}
	}
	return parsed{accepted: true, complete: true, status: status, stdout: body}
}

func digits(b []byte) bool {
	if len(b) == 0 || len(b) > 9 {
		return false
	}
	for _, c := range b {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// withDetails names the socket in an error that has no details of its own.
func withDetails(e *relayError, path string) *relayError {
	if e.details == "" {
		return &relayError{e.code, e.msg, path}
	}
	return &relayError{e.code, e.msg, path + ": " + e.details}
}

func isTimeout(err error) bool {
	var ne net.Error
	return err != nil && errors.As(err, &ne) && ne.Timeout()
}

// unwrap drops net's "dial unix /path:" prefix: the path is in the details already.
func unwrap(err error) error {
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		return op.Err
	}
	return err
}

func min(a, b int) int {
	if a < b {
		return a
	}
	return b
}
