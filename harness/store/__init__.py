"""The packed expert file on the SSD: its index, aligned buffers, and the O_DIRECT / buffered reader."""
