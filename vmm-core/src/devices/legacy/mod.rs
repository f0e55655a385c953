//! Legacy PC devices on port I/O: COM1 serial, the i8042 controller and the power-control port.
