//go:build tools

// Package tools pins h2spec (github.com/summerwind/h2spec) and the versions
// of its dependencies: tests/test_h2spec.py builds its command from here.
// v2.2.1 is the newest version the Go module proxy serves; it has no go.mod,
// so its dependencies are pinned in this module's.
package tools

import _ "github.com/summerwind/h2spec/cmd/h2spec"
