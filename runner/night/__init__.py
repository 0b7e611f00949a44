"""The night: the loop that proposes, runs and decides experiments (loop, judge, records, proposals), where
they run (cluster, cluster_node), its limits, its console and `overnight`, which starts it. It imports the
core and the agents, never the morning."""
