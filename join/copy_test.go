package join

import (
	"strings"
	"testing"
)

func TestFilterDump(t *testing.T) {
	dump := `\restrict abc
CREATE TABLE public.t (id int);

--
-- Name: t pgmesh_tombstone; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER pgmesh_tombstone AFTER DELETE ON public.t
    FOR EACH ROW EXECUTE FUNCTION pgmesh.record_tombstone('id');

--
-- Name: t pgmesh_home; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER pgmesh_home BEFORE INSERT ON public.t FOR EACH ROW EXECUTE FUNCTION pgmesh.check_home('home');

--
-- Name: pgmesh_capture_ddl; Type: EVENT TRIGGER; Schema: -; Owner: -
--

CREATE EVENT TRIGGER pgmesh_capture_ddl ON ddl_command_end
   EXECUTE FUNCTION pgmesh.capture_ddl();

--
-- Name: audit; Type: EVENT TRIGGER; Schema: -; Owner: -
--

CREATE EVENT TRIGGER audit ON ddl_command_end EXECUTE FUNCTION public.audit();
\unrestrict abc
`
	got := filterDump(dump)
	for _, gone := range []string{"restrict", "pgmesh.record_tombstone", "pgmesh.capture_ddl", "CREATE EVENT TRIGGER pgmesh_"} {
		if strings.Contains(got, gone) {
			t.Errorf("filtered dump still has %q:\n%s", gone, got)
		}
	}
	for _, kept := range []string{"CREATE TABLE public.t", "CREATE TRIGGER pgmesh_home", "CREATE EVENT TRIGGER audit"} {
		if !strings.Contains(got, kept) {
			t.Errorf("filtered dump lost %q:\n%s", kept, got)
		}
	}
}
