// Package api is the pgmesh daemon's HTTP API as types: the requests and
// answers of every route, for the local CLI (/v1/...) and for other members
// (/v1/cluster/..., which carry the group's token), and a typed client with
// one method per route.
package api

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/pgmesh/pgmesh/compare"
	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/replicator"
)

// StatusReport is the answer of GET /v1/status and `pgmesh status --json`.
type StatusReport struct {
	Node       string              `json:"node"`
	Group      string              `json:"group,omitempty"`
	State      string              `json:"state"`
	RaftState  string              `json:"raft_state"`
	RaftLeader string              `json:"raft_leader,omitempty"`
	Nodes      []*Node             `json:"nodes"`
	Peers      []replicator.Status `json:"peers"`
	Problems   []string            `json:"problems"`
	Join       *JoinStatus         `json:"join,omitempty"`
	// Slots are the slots peers consume on this node, with retained WAL.
	Slots []SlotStatus `json:"slots"`
	// Standbys are the other servers dsn names, when they are standbys of
	// this node's primary, and whether a failover to each is safe.
	Standbys []StandbyStatus `json:"standbys,omitempty"`
	// Promotion is the last promotion this node recovered from by making
	// the peers' slots again, when there was one.
	Promotion *PromotionStatus `json:"promotion,omitempty"`
	// Parked are the tables whose changes from a peer are parked here
	// (docs/apply-errors.md).
	Parked []ParkedTable `json:"parked,omitempty"`
	// LocalTables are the tables in no replication set: their changes stay
	// on the node that makes them.
	LocalTables []string `json:"local_tables,omitempty"`
	// RepsetsPublished identifies the replication sets this node's
	// publications hold (repset.Sets.Hash); equal on every node once a
	// change has taken effect everywhere.
	RepsetsPublished string `json:"repsets_published,omitempty"`
}

// Node is a member as the API shows it: status, join and register carry
// it. It is not the Raft state's membership.Node, so that either can change
// without the other; NodeOf and Member convert.
type Node struct {
	Name     string           `json:"name"`
	ID       int              `json:"id"`
	DSN      string           `json:"public_dsn"`
	API      string           `json:"api_addr"`
	Raft     string           `json:"raft_addr"`
	State    membership.State `json:"state"`
	JoinedAt time.Time        `json:"joined_at"`
	// LUWResolution is the member's luw_resolution (a Go duration); empty
	// for members recorded before it was.
	LUWResolution string `json:"luw_resolution,omitempty"`
}

// NodeOf is n as the API shows it (nil for nil).
func NodeOf(n *membership.Node) *Node {
	if n == nil {
		return nil
	}
	return &Node{Name: n.Name, ID: n.ID, DSN: n.DSN, API: n.API, Raft: n.Raft, State: n.State, JoinedAt: n.JoinedAt, LUWResolution: n.LUWResolution}
}

// NodesOf converts a list of members.
func NodesOf(ns []*membership.Node) []*Node {
	out := make([]*Node, len(ns))
	for i, n := range ns {
		out[i] = NodeOf(n)
	}
	return out
}

// Member is n as the Raft state records it.
func (n *Node) Member() *membership.Node {
	return &membership.Node{Name: n.Name, ID: n.ID, DSN: n.DSN, API: n.API, Raft: n.Raft, State: n.State, JoinedAt: n.JoinedAt, LUWResolution: n.LUWResolution}
}

// Conflict is one pgmesh.conflict_history row as the API returns it.
type Conflict struct {
	ID             int64           `json:"id"`
	OccurredAt     time.Time       `json:"occurred_at"`
	LocalNode      string          `json:"local_node"`
	OriginNode     string          `json:"origin_node"`
	Relation       string          `json:"relation"`
	Type           string          `json:"conflict_type"`
	Resolution     string          `json:"resolution"`
	KeyTuple       json.RawMessage `json:"key_tuple"`
	LocalTuple     json.RawMessage `json:"local_tuple"`
	RemoteTuple    json.RawMessage `json:"remote_tuple"`
	AppliedTuple   json.RawMessage `json:"applied_tuple"`
	LocalCommitTS  *time.Time      `json:"local_commit_ts"`
	LocalOrigin    *string         `json:"local_origin"`
	RemoteCommitTS *time.Time      `json:"remote_commit_ts"`
	RemoteLSN      *string         `json:"remote_commit_lsn"`
	RemoteXID      *int64          `json:"remote_xid"`
	Reason         *string         `json:"reason"`
}

// CompareRequest asks for a comparison (and, with Repair, a repair) of
// tables on every active member.
type CompareRequest struct {
	Tables    []string `json:"tables,omitempty"`
	ChunkRows int      `json:"chunk_rows,omitempty"`
	Repair    bool     `json:"repair,omitempty"`
	DryRun    bool     `json:"dry_run,omitempty"`
	// ListOnly returns the tables that would be compared, in Names.
	ListOnly bool `json:"list_only,omitempty"`
}

// CompareResponse carries the results, and the repair's actions.
type CompareResponse struct {
	Nodes   []string              `json:"nodes"`
	Tables  []compare.TableResult `json:"tables"`
	Actions []compare.Action      `json:"actions,omitempty"`
	Names   []string              `json:"names,omitempty"`
}

// DDLRequest runs a DDL statement on every node under the global DDL lock.
type DDLRequest struct {
	SQL     string `json:"sql"`
	Timeout string `json:"timeout,omitempty"`
	Proceed bool   `json:"proceed,omitempty"`
}

type LockRequest struct {
	Lock    string `json:"lock"`
	Node    string `json:"node"`
	Release bool   `json:"release,omitempty"`
	TTLms   int64  `json:"ttl_ms,omitempty"`
}

// CreateRequest asks the local daemon to bootstrap a group.
type CreateRequest struct {
	Name string `json:"name"`
}

// CreateResponse carries the join token, shown once.
type CreateResponse struct {
	Group string `json:"group"`
	Node  *Node  `json:"node"`
	Token string `json:"token"`
}

// JoinRequest asks the local daemon to join the group of the daemon at Via.
type JoinRequest struct {
	Via   string `json:"via"`
	Token string `json:"token"`
}

// JoinResponse reports the node as registered.
type JoinResponse struct {
	Group string `json:"group"`
	Node  *Node  `json:"node"`
}

// PartRequest asks to remove a node from the group.
type PartRequest struct {
	Name  string `json:"name"`
	Force bool   `json:"force,omitempty"`
}

// StateRequest sets a member's state (member-to-member).
type StateRequest struct {
	Name  string           `json:"name"`
	State membership.State `json:"state"`
}

// RegisterRequest registers a node (member-to-member).
type RegisterRequest struct {
	Node Node `json:"node"`
}

// HealthReport is the answer of GET /health.
type HealthReport struct {
	Status  string   `json:"status"` // "ok" or "unhealthy"
	Node    string   `json:"node"`
	Reasons []string `json:"reasons,omitempty"`
	// Warnings are what an operator should know that does not keep this
	// node from serving (a standby not ready for a failover).
	Warnings []string `json:"warnings,omitempty"`
}

// WaitRequest asks the daemon to wait until peers applied this node's writes.
type WaitRequest struct {
	Timeout string   `json:"timeout"`
	Peers   []string `json:"peers,omitempty"`
}

// WaitResponse says whether they did in time.
type WaitResponse struct {
	Applied  bool  `json:"applied"`
	WaitedMS int64 `json:"waited_ms"`
}

type PauseResponse struct {
	ID string `json:"id"`
}

type ResumeRequest struct {
	ID string `json:"id"`
}

type ResumeResponse struct {
	// Held is false when the lease ran out before the resume.
	Held bool `json:"held"`
}

// AuditRow is one column or sequence that cannot hold global values yet.
type AuditRow struct {
	What      string  `json:"what"`
	Table     string  `json:"table"`
	Column    *string `json:"column"`
	Type      string  `json:"type"`
	Statement string  `json:"statement"`
}

// ConvertRequest converts sequences to a global kind on every node.
type ConvertRequest struct {
	Kind      string   `json:"kind"` // timeshard or galloc
	Sequences []string `json:"sequences,omitempty"`
	ChunkSize int64    `json:"chunk_size,omitempty"`
}

// SequenceInfo describes a global sequence for `pgmesh sequences show`.
type SequenceInfo struct {
	Sequence  string             `json:"sequence"`
	Kind      string             `json:"kind"`
	ChunkSize *int64             `json:"chunk_size,omitempty"`
	Chunks    []membership.Chunk `json:"chunks,omitempty"`
}

type GallocRequest struct {
	Seq      string `json:"seq"`
	Node     string `json:"node"`
	Size     int64  `json:"size"`
	MinStart int64  `json:"min_start"`
}

// SlotStatus is the slot on this node that a peer consumes, and the WAL it
// holds back here.
type SlotStatus struct {
	Peer          string `json:"peer"`
	Active        bool   `json:"active"`
	RetainedBytes int64  `json:"retained_bytes"`
	// Lagging is set past wal_retention_warn.
	Lagging bool `json:"lagging"`
}

// StandbyStatus is a physical standby of this node's primary: whether a
// failover to it would lose nothing and keep every peer streaming.
type StandbyStatus struct {
	Server string `json:"server"` // host:port
	Ready  bool   `json:"ready"`
	// Reason is the first thing that keeps it from being ready.
	Reason string `json:"reason,omitempty"`
	// Note is what a failover to a ready standby costs, if anything.
	Note string `json:"note,omitempty"`
}

// PromotionStatus is the last promotion of this node's Postgres from a
// standby that held no copy of the peers' slots: whose slots were made
// again, and the repair of what no stream carried (docs/high-availability.md).
type PromotionStatus struct {
	Timeline   int        `json:"timeline"`
	Peers      []string   `json:"peers"`
	DetectedAt time.Time  `json:"detected_at"`
	RepairedAt *time.Time `json:"repaired_at,omitempty"`
	// RepairedRows is how many rows the repair wrote again.
	RepairedRows *int   `json:"repaired_rows,omitempty"`
	LastError    string `json:"last_error,omitempty"`
}

// JoinStatus is the progress of this node's join, in status and the
// pgmesh.join_progress view.
type JoinStatus struct {
	Via         string    `json:"via"`
	Phase       string    `json:"phase"`
	TablesTotal int       `json:"tables_total"`
	TablesDone  int       `json:"tables_done"`
	Rows        int64     `json:"rows_copied"`
	Bytes       int64     `json:"bytes_copied"`
	BytesTotal  int64     `json:"bytes_total"`
	StartedAt   time.Time `json:"started_at"`
	Done        bool      `json:"done"`
	Error       string    `json:"error,omitempty"`
}

// RepsetRequest changes the replication sets (pgmesh repset create, add,
// remove, drop).
type RepsetRequest struct {
	Action  string   `json:"action"`
	Set     string   `json:"set"`
	Nodes   []string `json:"nodes,omitempty"`
	Tables  []string `json:"tables,omitempty"`
	Where   string   `json:"where,omitempty"`
	Columns []string `json:"columns,omitempty"`
	// Sync, on add, compares the tables once every node publishes the
	// change and writes each row a member lacks again, so members that did
	// not receive a table (or those rows) before get its existing rows.
	Sync bool `json:"sync,omitempty"`
}

// RepsetsResponse shows the sets as they are (after a change).
type RepsetsResponse struct {
	Sets []RepsetView `json:"sets"`
	// LocalTables are in no set: their changes stay where they are made.
	LocalTables []string `json:"local_tables"`
	// Pending are members that had not yet published the change when the
	// answer was given; each does when it is reachable again.
	Pending []string `json:"pending,omitempty"`
	// Synced is the comparison --sync ran, with its writes.
	Synced *CompareResponse `json:"synced,omitempty"`
}

// RepsetView is one set with its tables spelled out.
type RepsetView struct {
	Name string `json:"name"`
	// Nodes are the members receiving it; empty with AllNodes.
	Nodes    []string `json:"nodes"`
	AllNodes bool     `json:"all_nodes"`
	// NewTables says that tables created later join the set.
	NewTables bool              `json:"new_tables"`
	Tables    []RepsetTableView `json:"tables"`
}

// RepsetTableView is a table of a set.
type RepsetTableView struct {
	Table   string   `json:"table"`
	Where   string   `json:"where,omitempty"`
	Columns []string `json:"columns,omitempty"`
}

// Setting is a change every active member must make alike, because
// replication depends on all of them doing it: exactly one field is set.
type Setting struct {
	// DeltaColumn applies remote updates of a numeric column as increments.
	DeltaColumn *ColumnSetting `json:"delta_column,omitempty"`
	// HomeColumn lets only the node named in the column write a row.
	HomeColumn *ColumnSetting `json:"home_column,omitempty"`
	// Timeshard and Galloc make a sequence unique across the group.
	Timeshard *SequenceSetting `json:"timeshard,omitempty"`
	Galloc    *SequenceSetting `json:"galloc,omitempty"`
	// BigintAudit applies the statements pgmesh sequences audit lists.
	BigintAudit bool `json:"bigint_audit,omitempty"`
	// ApplyError sets a table's on_apply_error.
	ApplyError *ApplyErrorSetting `json:"apply_error,omitempty"`
}

// ApplyErrorSetting is a table's on_apply_error: park, stop, or "" for the
// daemon's own setting.
type ApplyErrorSetting struct {
	Table  string `json:"table"`
	Policy string `json:"policy"`
}

// ColumnSetting names a table's column; Enabled false takes the setting off.
type ColumnSetting struct {
	Table   string `json:"table"`
	Column  string `json:"column"`
	Enabled bool   `json:"enabled"`
}

// SequenceSetting converts a sequence; ChunkSize and MinStart are galloc's.
type SequenceSetting struct {
	Sequence  string `json:"sequence"`
	ChunkSize int64  `json:"chunk_size,omitempty"`
	MinStart  int64  `json:"min_start,omitempty"`
}

// Check reports a setting that does not say exactly one thing.
func (s Setting) Check() error {
	n := 0
	for _, set := range []bool{s.DeltaColumn != nil, s.HomeColumn != nil, s.Timeshard != nil, s.Galloc != nil, s.BigintAudit, s.ApplyError != nil} {
		if set {
			n++
		}
	}
	if n != 1 {
		return fmt.Errorf("a setting must change exactly one thing, this one changes %d", n)
	}
	if e := s.ApplyError; e != nil && e.Policy != "" && e.Policy != replicator.OnErrorPark && e.Policy != replicator.OnErrorStop {
		return fmt.Errorf("on_apply_error %q of %s is not park, stop or default", e.Policy, e.Table)
	}
	return nil
}

// String names the setting for messages, e.g. "delta column balance of public.accounts".
func (s Setting) String() string {
	switch {
	case s.DeltaColumn != nil:
		return fmt.Sprintf("delta column %s of %s", s.DeltaColumn.Column, s.DeltaColumn.Table)
	case s.HomeColumn != nil:
		return fmt.Sprintf("home column %s of %s", s.HomeColumn.Column, s.HomeColumn.Table)
	case s.Timeshard != nil:
		return "timeshard sequence " + s.Timeshard.Sequence
	case s.Galloc != nil:
		return "galloc sequence " + s.Galloc.Sequence
	case s.BigintAudit:
		return "the bigint audit"
	case s.ApplyError != nil:
		return "on_apply_error of " + s.ApplyError.Table
	}
	return "an empty setting"
}

// SettingResponse lists the nodes where the change was made.
type SettingResponse struct {
	Nodes []string `json:"nodes"`
}

// ParkedTable is what waits in pgmesh.parked_changes for one table from
// one peer.
type ParkedTable struct {
	Peer    string    `json:"peer"`
	Table   string    `json:"table"`
	Changes int64     `json:"changes"`
	Since   time.Time `json:"since"`
	// Error is the error that parked the table.
	Error string `json:"error,omitempty"`
}

// QueueRequest asks for a replay (POST /v1/parked/replay) or a discard
// (POST /v1/parked/discard) of a table's parked changes, from one peer or
// from every peer that has some.
type QueueRequest struct {
	Table  string `json:"table"`
	Peer   string `json:"peer,omitempty"`
	DryRun bool   `json:"dry_run,omitempty"`
}

// QueueResponse is what each peer's replay or discard did.
type QueueResponse struct {
	Results []replicator.QueueResult `json:"results"`
}
