package bytesize

import "testing"

func TestParseAndFormat(t *testing.T) {
	for in, want := range map[string]int64{"512MB": 512 << 20, "1GB": 1 << 30, "64kB": 64 << 10, "100": 100, " 2 TB ": 2 << 40} {
		if got, err := Parse(in); err != nil || got != want {
			t.Errorf("Parse(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "1.5GB", "-1", "ten"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) accepted", bad)
		}
	}
	if got := Format(3 << 29); got != "1.5GB" {
		t.Errorf("Format(1.5 GiB) = %s", got)
	}
}
