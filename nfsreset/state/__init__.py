"""Client lists that outlive a process: the state directory's files and the
Pacemaker attrd backend."""
