"""moeplan probe: discover a cluster's topology and measure its links (torch users live here)."""
