package api

import (
	"encoding/json"
	"strings"
	"testing"
)

// A setting says exactly one thing, and says it the same way after the trip
// between members.
func TestSettingCheck(t *testing.T) {
	col := &ColumnSetting{Table: "accounts", Column: "balance", Enabled: true}
	for _, c := range []struct {
		s    Setting
		want string
	}{
		{Setting{DeltaColumn: col}, ""},
		{Setting{BigintAudit: true}, ""},
		{Setting{}, "changes 0"},
		{Setting{DeltaColumn: col, HomeColumn: col}, "changes 2"},
	} {
		err := c.s.Check()
		if (err == nil) != (c.want == "") || err != nil && !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: error %v, want %q", c.s, err, c.want)
		}
	}
	b, err := json.Marshal(Setting{HomeColumn: col})
	if err != nil {
		t.Fatal(err)
	}
	var back Setting
	if err := json.Unmarshal(b, &back); err != nil || back.HomeColumn == nil || *back.HomeColumn != *col || back.Check() != nil {
		t.Fatalf("round trip of %s: %+v, %v", b, back, err)
	}
}
