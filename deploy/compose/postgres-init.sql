-- One role, two databases (node and service), created on PostgreSQL's first start.
CREATE DATABASE her2low_node OWNER her2low;
CREATE DATABASE her2low_cds OWNER her2low;
