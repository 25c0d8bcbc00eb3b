// registry tests
